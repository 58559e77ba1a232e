//! Errors of the hardware layer.

use crate::addr::AddrOverflow;
use crate::bdf::Bdf;
use crate::config::ConfigAccessError;
use crate::errno::{AsErrno, Errno};
use std::fmt;

/// A fabric description that cannot be built: where it is wrong and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricError {
    /// The file, when the description came from one.
    pub file: Option<String>,
    /// 1-based line in that file, when known.
    pub line: Option<usize>,
    /// The key path, e.g. `device[3].bars[1].size`.
    pub key: String,
    /// What is wrong, in plain words.
    pub message: String,
}

impl FabricError {
    /// An error at a key path, with no position yet.
    pub fn at(key: impl Into<String>, message: impl Into<String>) -> FabricError {
        FabricError {
            file: None,
            line: None,
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FabricError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}:")?;
            if let Some(line) = self.line {
                write!(f, "{line}:")?;
            }
            f.write_str(" ")?;
        } else if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for FabricError {}

impl AsErrno for FabricError {
    fn errno(&self) -> Errno {
        Errno::EINVAL
    }
}

/// A run-time request to the hardware that cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// No function with that address in the fabric.
    #[error("no PCI function {0} in this fabric")]
    NoDevice(Bdf),
    /// The function exists in the fabric but is not present now (a VF while VF Enable is off).
    #[error("{0} is not present (its PF has VF Enable off, or NumVFs excludes it)")]
    NotPresent(Bdf),
    /// No device answers to this name or address.
    #[error("no PCI function named or addressed {0:?}")]
    UnknownName(String),
    /// Illegal config access.
    #[error("{bdf}: {err}")]
    Config {
        /// The function.
        bdf: Bdf,
        /// What is wrong with the access.
        err: ConfigAccessError,
    },
    /// The BAR index is not an implemented BAR of this function.
    #[error("{bdf} has no BAR {bar}")]
    NoBar {
        /// The function.
        bdf: Bdf,
        /// The index asked for.
        bar: u8,
    },
    /// An access that does not fit inside the BAR.
    #[error(
        "{bdf} BAR {bar}: {len} bytes at offset {offset:#x} run past the BAR's {size:#x} bytes"
    )]
    OutsideBar {
        /// The function.
        bdf: Bdf,
        /// BAR index.
        bar: u8,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The BAR's size.
        size: u64,
    },
    /// Address arithmetic overflowed.
    #[error(transparent)]
    Overflow(#[from] AddrOverflow),
}

impl AsErrno for PciError {
    fn errno(&self) -> Errno {
        match self {
            PciError::NoDevice(_) | PciError::NotPresent(_) | PciError::UnknownName(_) => {
                Errno::ENODEV
            }
            PciError::Config { .. } | PciError::NoBar { .. } | PciError::OutsideBar { .. } => {
                Errno::EINVAL
            }
            PciError::Overflow(_) => Errno::EOVERFLOW,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fabric_error_names_file_line_and_key() {
        let mut e = FabricError::at("device[2].parent", "unknown parent \"x\"");
        assert_eq!(e.to_string(), "device[2].parent: unknown parent \"x\"");
        e.file = Some("f.toml".into());
        e.line = Some(12);
        assert_eq!(
            e.to_string(),
            "f.toml:12: device[2].parent: unknown parent \"x\""
        );
    }

    #[test]
    fn errnos() {
        let b: Bdf = "0000:01:00.0".parse().unwrap();
        assert_eq!(PciError::NoDevice(b).errno(), Errno::ENODEV);
        assert_eq!(PciError::NoBar { bdf: b, bar: 7 }.errno(), Errno::EINVAL);
        assert_eq!(
            PciError::Overflow(AddrOverflow {
                base: 1,
                delta: u64::MAX
            })
            .errno(),
            Errno::EOVERFLOW
        );
    }
}
