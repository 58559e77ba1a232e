//! Byte sizes as people write them: `4096`, `"64K"`, `"16M"`, `"64G"`, `"1T"` (binary units).

use std::fmt;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a size: {why} (write e.g. 4096, \"64K\", \"16M\", \"64G\")")]
pub struct ParseSizeError {
    /// The text that failed.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses a size: decimal or `0x` hex digits, optionally followed by one of `K`, `M`, `G`,
/// `T`, `P` (powers of 1024, optionally followed by `iB` or `B`).
pub fn parse_size(s: &str) -> Result<u64, ParseSizeError> {
    let err = |why| ParseSizeError {
        input: s.to_string(),
        why,
    };
    let t = s.trim();
    let (digits, shift) = {
        let lower = t.to_ascii_lowercase();
        let stripped = lower
            .strip_suffix("ib")
            .or_else(|| lower.strip_suffix('b'))
            .unwrap_or(&lower)
            .to_string();
        match stripped.chars().last() {
            Some('k') => (stripped[..stripped.len() - 1].to_string(), 10),
            Some('m') => (stripped[..stripped.len() - 1].to_string(), 20),
            Some('g') => (stripped[..stripped.len() - 1].to_string(), 30),
            Some('t') => (stripped[..stripped.len() - 1].to_string(), 40),
            Some('p') => (stripped[..stripped.len() - 1].to_string(), 50),
            _ => (stripped, 0),
        }
    };
    let digits = digits.trim().replace('_', "");
    if digits.is_empty() {
        return Err(err("no number"));
    }
    let n = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).map_err(|_| err("bad hex number"))?
    } else {
        digits.parse::<u64>().map_err(|_| err("bad number"))?
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("larger than 2^64 - 1"))
}

/// Formats a size the short way when it is a whole number of a binary unit (`16M`, `64G`),
/// else in bytes.
pub fn format_size(n: u64) -> String {
    const UNITS: [(u32, &str); 5] = [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")];
    for (shift, unit) in UNITS {
        if n >= (1u64 << shift) && n.trailing_zeros() >= shift {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// A size that displays the short way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("64g"), Ok(64 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0x1000"), Ok(0x1000));
        assert_eq!(parse_size("1_024"), Ok(1024));
        assert_eq!(parse_size("16E").unwrap_err().why, "bad number");
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999P").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn formats_short() {
        assert_eq!(format_size(16 << 20), "16M");
        assert_eq!(format_size(64 << 30), "64G");
        assert_eq!(format_size(256), "256");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(0), "0");
        assert_eq!(Size(1 << 40).to_string(), "1T");
    }
}
