//! Unit tests of `src/runtime.rs` (kept apart so the module stays readable).

use super::*;

#[test]
fn device_parsing() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
    assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
    assert!("gpu".parse::<Device>().unwrap_err().contains("expected"));
    assert!("cuda:-1".parse::<Device>().is_err());
}
