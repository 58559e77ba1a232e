//! Linux error numbers.
//!
//! Every layer of peerdma has its own error enum; each maps to one [`Errno`] so that the
//! emulated stack returns exactly what the kernel returns. The numbers are the x86-64/generic
//! Linux values.

use std::fmt;

/// A Linux errno value (positive, as in `errno.h`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident = $val:expr, $text:expr;)*) => {
        impl Errno {
            $(
                #[doc = $text]
                pub const $name: Errno = Errno($val);
            )*

            /// The symbolic name (`"EINVAL"`), or `None` for a number this table does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            /// A short description in the words of `strerror`.
            pub fn description(self) -> &'static str {
                match self.0 {
                    $($val => $text,)*
                    _ => "unknown error",
                }
            }

            /// Looks an errno up by its symbolic name (`"ENODEV"`).
            pub fn from_name(name: &str) -> Option<Errno> {
                match name {
                    $(stringify!($name) => Some(Errno::$name),)*
                    _ => None,
                }
            }
        }
    };
}

errnos! {
    EPERM = 1, "Operation not permitted";
    ENOENT = 2, "No such file or directory";
    EINTR = 4, "Interrupted system call";
    EIO = 5, "Input/output error";
    ENXIO = 6, "No such device or address";
    E2BIG = 7, "Argument list too long";
    EBADF = 9, "Bad file descriptor";
    EAGAIN = 11, "Resource temporarily unavailable";
    ENOMEM = 12, "Cannot allocate memory";
    EACCES = 13, "Permission denied";
    EFAULT = 14, "Bad address";
    EBUSY = 16, "Device or resource busy";
    EEXIST = 17, "File exists";
    ENODEV = 19, "No such device";
    EINVAL = 22, "Invalid argument";
    EMFILE = 24, "Too many open files";
    ENOTTY = 25, "Inappropriate ioctl for device";
    ENOSPC = 28, "No space left on device";
    ERANGE = 34, "Numerical result out of range";
    ENOSYS = 38, "Function not implemented";
    EOVERFLOW = 75, "Value too large for defined data type";
    EOPNOTSUPP = 95, "Operation not supported";
    ETIMEDOUT = 110, "Connection timed out";
    EREMOTEIO = 121, "Remote I/O error";
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} ({})", self.description()),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl std::error::Error for Errno {}

/// Implemented by every error type that has a Linux errno.
pub trait AsErrno {
    /// The errno the kernel would return for this error.
    fn errno(&self) -> Errno;
}

impl AsErrno for Errno {
    fn errno(&self) -> Errno {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_linux() {
        assert_eq!(Errno::EINVAL.0, 22);
        assert_eq!(Errno::ENODEV.0, 19);
        assert_eq!(Errno::EOVERFLOW.0, 75);
        assert_eq!(Errno::EOPNOTSUPP.0, 95);
        assert_eq!(Errno::ENOTTY.0, 25);
        assert_eq!(Errno::EREMOTEIO.0, 121);
    }

    #[test]
    fn names_round_trip() {
        for e in [Errno::EPERM, Errno::EBUSY, Errno::ENOMEM, Errno::EEXIST] {
            assert_eq!(Errno::from_name(e.name().unwrap()), Some(e));
        }
        assert_eq!(Errno(9999).name(), None);
        assert_eq!(format!("{:?}", Errno(9999)), "Errno(9999)");
        assert_eq!(format!("{}", Errno::ENODEV), "ENODEV (No such device)");
    }
}
