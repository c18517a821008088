//! Small kernel files read into a caller's buffer: kept open and re-read
//! with `pread`, or opened per read; and the number parsers over them.

use super::*;

/// A cgroup file kept open and re-read with `pread` at offset 0 (the kernel
/// regenerates its content on every read from the start): one syscall per
/// read instead of three. The collector holds two or three descriptors per
/// sandbox; if the process runs out (EMFILE) the file is opened per read.
#[derive(Debug)]
pub(super) struct KernelFile {
    pub(super) path: PathBuf,
    file: Option<File>,
}

/// `EMFILE`: the process has no descriptor left.
pub(super) const TOO_MANY_OPEN_FILES: i32 = 24;

impl KernelFile {
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// The kept-open file, opened on first use; `None` when the process has
    /// no descriptor left (EMFILE), in which case the caller reads by path.
    pub(super) fn open(&mut self) -> std::io::Result<Option<&File>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(error) if error.raw_os_error() == Some(TOO_MANY_OPEN_FILES) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
        Ok(self.file.as_ref())
    }

    pub(super) fn read<'a>(&mut self, buffer: &'a mut [u8]) -> std::io::Result<&'a [u8]> {
        let Some(file) = self.open()? else {
            return read_small(&self.path, buffer);
        };
        let length = file.read_at(buffer, 0)?;
        Ok(&buffer[..length])
    }

    /// Reads the whole file into `out`. Kernel files generated in records
    /// (`/proc/net/dev`, `io.stat`) return only whole lines per read, so one
    /// read of a fixed buffer may silently stop early: read on until the end.
    pub(super) fn read_all(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        let Some(file) = self.open()? else {
            out.extend_from_slice(&std::fs::read(&self.path)?);
            return Ok(());
        };
        let mut chunk = [0_u8; 4096];
        loop {
            let length = file.read_at(&mut chunk, out.len() as u64)?;
            if length == 0 {
                return Ok(());
            }
            out.extend_from_slice(&chunk[..length]);
        }
    }
}

pub(super) fn read_small<'a>(path: &Path, buffer: &'a mut [u8]) -> std::io::Result<&'a [u8]> {
    let mut file = File::open(path)?;
    let length = file.read(buffer)?;
    Ok(&buffer[..length])
}

/// The number after `key ` on the line starting with it (`cpu.stat`, `cgroup.events`).
pub fn field_value(text: &[u8], key: &str) -> Option<u64> {
    text.split(|byte| *byte == b'\n').find_map(|line| {
        let rest = line.strip_prefix(key.as_bytes())?.strip_prefix(b" ")?;
        parse_number(rest)
    })
}

pub(super) fn parse_number(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}
