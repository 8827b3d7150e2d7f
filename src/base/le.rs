//! Little-endian float decoding (core): the one decoder of f32, f16 and
//! bf16 values stored as little-endian bytes, for safetensors checkpoints
//! ([`crate::backbone`]) and cache layer frames ([`crate::cache`]). A
//! trailing partial value is ignored; callers check lengths first.

/// Little-endian f32 values.
pub fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Little-endian IEEE half-precision values, widened to f32.
pub fn f16s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// Little-endian bfloat16 values, widened to f32.
pub fn bf16s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_each_width() {
        assert_eq!(super::f32s(&1.5f32.to_le_bytes()), vec![1.5]);
        assert_eq!(
            super::f16s(&half::f16::from_f32(-2.0).to_le_bytes()),
            vec![-2.0]
        );
        assert_eq!(
            super::bf16s(&half::bf16::from_f32(0.5).to_le_bytes()),
            vec![0.5]
        );
    }
}
