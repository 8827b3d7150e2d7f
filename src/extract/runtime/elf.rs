//! A check of a shared library file before the loader maps it: a truncated
//! ELF file (an interrupted copy) makes `dlopen` map segments past the end
//! of the file, and the first touch of one kills the process with SIGBUS,
//! printing nothing. Reading the ELF header and program headers here, with
//! safe code, turns that into an error naming the file.
//!
//! Only 64-bit little-endian ELF (Linux on x86-64 and aarch64, the builds
//! sherl fetches) is checked; anything else (Mach-O, PE, 32-bit or
//! big-endian ELF) is left to the loader, whose own reason is reported.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Bytes of a 64-bit ELF header.
const EHDR_LEN: usize = 64;
/// Bytes of a 64-bit ELF program header.
const PHDR_LEN: u64 = 56;
/// `p_type` of a loadable segment.
const PT_LOAD: u32 = 1;

fn u16_at(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What is wrong with the shared library at `path`, if its headers show
/// something: `Ok(None)` for a complete 64-bit little-endian ELF file and
/// for a file of another format (left to the loader); `Ok(Some(why))` for
/// one whose headers describe more bytes than it has; `Err` when it cannot
/// be opened as a regular file.
pub(super) fn truncation(path: &Path) -> crate::Result<Option<String>> {
    let mut file = crate::fsutil::open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| crate::Error::io(path, e))?
        .len();
    let mut ehdr = Vec::with_capacity(EHDR_LEN);
    (&mut file)
        .take(EHDR_LEN as u64)
        .read_to_end(&mut ehdr)
        .map_err(|e| crate::Error::io(path, e))?;
    if !ehdr.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    if ehdr.len() < EHDR_LEN {
        return Ok(Some(format!(
            "{len} bytes, shorter than an ELF header ({EHDR_LEN} bytes)"
        )));
    }
    // e_ident[EI_CLASS] = ELFCLASS64, e_ident[EI_DATA] = ELFDATA2LSB
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(None);
    }
    let (phoff, shoff) = (u64_at(&ehdr, 0x20), u64_at(&ehdr, 0x28));
    let (phentsize, phnum) = (u16_at(&ehdr, 0x36), u16_at(&ehdr, 0x38));
    let (shentsize, shnum) = (u16_at(&ehdr, 0x3a), u16_at(&ehdr, 0x3c));
    let short = |what: &str, end: Option<u64>| match end {
        Some(end) if end <= len => None,
        Some(end) => Some(format!("{len} bytes, but its {what} ends at byte {end}")),
        None => Some(format!("its {what} lies beyond any file size")),
    };
    // Section headers (not loaded, but the table is the file's last part,
    // so it tells a cut file best). e_shnum 0 with a table means the count
    // is in section 0 (more than 0xff00 sections): check that one at least.
    if shoff != 0 {
        let end = shnum
            .max(1)
            .checked_mul(shentsize)
            .and_then(|n| shoff.checked_add(n));
        if let Some(why) = short("section header table", end) {
            return Ok(Some(why));
        }
    }
    if phnum == 0 {
        return Ok(None);
    }
    if phentsize < PHDR_LEN {
        return Ok(Some(format!(
            "its program headers are {phentsize} bytes, less than the {PHDR_LEN} of ELF64"
        )));
    }
    let table = phnum.checked_mul(phentsize).expect("u16 x u16 fits u64");
    if let Some(why) = short("program header table", phoff.checked_add(table)) {
        return Ok(Some(why));
    }
    let mut phdrs = vec![0u8; table as usize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| crate::Error::io(path, e))?;
    for ph in phdrs.chunks_exact(phentsize as usize) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, filesz) = (u64_at(ph, 8), u64_at(ph, 0x20));
        if let Some(why) = short("loadable segment", offset.checked_add(filesz)) {
            return Ok(Some(why));
        }
    }
    Ok(None)
}
