//! Detail read every [`DETAIL_EVERY`] ticks: pressure stall totals, peak
//! memory and block I/O, from v2 files or their v1 equivalents.

use super::*;

/// Rereads the detail files into `sandbox.detail` (GPU fields untouched); a
/// file that cannot be read leaves its value as it was.
pub(super) fn read_detail_files(sandbox: &mut Discovered) {
    let mut buffer = [0_u8; 512];
    let files = &mut sandbox.detail_files;
    let detail = &mut sandbox.detail;
    for (file, value) in [
        (&mut files.cpu_pressure, &mut detail.cpu_pressure_usec),
        (&mut files.memory_pressure, &mut detail.mem_pressure_usec),
        (&mut files.io_pressure, &mut detail.io_pressure_usec),
    ] {
        if let Some(total) = file.read(&mut buffer).ok().and_then(pressure_total) {
            *value = total;
        }
    }
    if let Some(peak) = files.peak.as_mut() {
        if let Some(bytes) = peak.read(&mut buffer).ok().and_then(parse_number) {
            detail.mem_peak_bytes = bytes;
        }
    }
    let mut text = Vec::new();
    let bytes = match files.io.as_mut() {
        Some(IoSource::V2Stat(file)) => file.read_all(&mut text).map(|()| io_stat_bytes(&text)),
        Some(IoSource::V1ServiceBytes(file)) => file
            .read_all(&mut text)
            .map(|()| blkio_service_bytes(&text)),
        None => return,
    };
    if let Ok((read, written)) = bytes {
        (detail.io_read_bytes, detail.io_write_bytes) = (read, written);
    }
}

/// `total=` of the `some` line of a PSI file, microseconds.
pub fn pressure_total(text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?;
    let some = text.lines().find(|line| line.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Bytes read and written over every device of a v2 `io.stat`
/// (`8:0 rbytes=1 wbytes=2 rios=..`).
pub fn io_stat_bytes(text: &[u8]) -> (u64, u64) {
    let text = std::str::from_utf8(text).unwrap_or_default();
    let (mut read, mut written) = (0_u64, 0_u64);
    for field in text.split_whitespace() {
        if let Some(value) = field
            .strip_prefix("rbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            read = read.saturating_add(value);
        } else if let Some(value) = field
            .strip_prefix("wbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            written = written.saturating_add(value);
        }
    }
    (read, written)
}

/// Bytes read and written over every device of a v1
/// `blkio.throttle.io_service_bytes` (`8:0 Read 4096`; the `Total` line and
/// other operations are left out).
pub fn blkio_service_bytes(text: &[u8]) -> (u64, u64) {
    let text = std::str::from_utf8(text).unwrap_or_default();
    let (mut read, mut written) = (0_u64, 0_u64);
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_device), Some(operation), Some(value)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(value) = value.parse::<u64>() else {
            continue;
        };
        match operation {
            "Read" => read = read.saturating_add(value),
            "Write" => written = written.saturating_add(value),
            _ => {}
        }
    }
    (read, written)
}
