//! PCI function addresses: domain, bus, device, function.

use std::fmt;
use std::str::FromStr;

/// A PCI function address, printed and parsed as `DDDD:BB:DD.F` (`0000:03:00.0`).
///
/// `device` is 0..=31 and `function` 0..=7; the constructor refuses anything else, so a
/// `Bdf` is always valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    domain: u16,
    bus: u8,
    devfn: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:03:00.0): {why}")]
pub struct ParseBdfError {
    /// The text that failed to parse.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Bdf {
    /// A function address; `None` if `device` > 31 or `function` > 7.
    pub const fn new(domain: u16, bus: u8, device: u8, function: u8) -> Option<Bdf> {
        if device > 31 || function > 7 {
            return None;
        }
        Some(Bdf {
            domain,
            bus,
            devfn: (device << 3) | function,
        })
    }

    /// From a domain, bus and the combined 8-bit `devfn`.
    pub const fn from_devfn(domain: u16, bus: u8, devfn: u8) -> Bdf {
        Bdf { domain, bus, devfn }
    }

    /// The PCI segment (domain) number.
    pub const fn domain(self) -> u16 {
        self.domain
    }
    /// The bus number.
    pub const fn bus(self) -> u8 {
        self.bus
    }
    /// The device (slot) number, 0..=31.
    pub const fn device(self) -> u8 {
        self.devfn >> 3
    }
    /// The function number, 0..=7.
    pub const fn function(self) -> u8 {
        self.devfn & 7
    }
    /// `device << 3 | function`.
    pub const fn devfn(self) -> u8 {
        self.devfn
    }
    /// The 16-bit PCIe Requester ID (`bus << 8 | devfn`).
    pub const fn requester_id(self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn as u16
    }
    /// The same address with another function number (0..=7).
    pub const fn with_function(self, function: u8) -> Option<Bdf> {
        Bdf::new(self.domain, self.bus, self.device(), function)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain,
            self.bus,
            self.device(),
            self.function()
        )
    }
}

impl fmt::Debug for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Bdf {
    type Err = ParseBdfError;

    /// Parses `DDDD:BB:DD.F`, or `BB:DD.F` with domain 0 (as `lspci` prints it).
    fn from_str(s: &str) -> Result<Bdf, ParseBdfError> {
        let err = |why| ParseBdfError {
            input: s.to_string(),
            why,
        };
        let (head, func) = s
            .rsplit_once('.')
            .ok_or_else(|| err("no '.' before the function"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (dom, bus, dev) = match parts.as_slice() {
            [d, b, v] => (Some(*d), *b, *v),
            [b, v] => (None, *b, *v),
            _ => return Err(err("expected two or three ':'-separated fields")),
        };
        let hex = |t: &str, max_digits: usize, what| {
            if t.is_empty() || t.len() > max_digits || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                Err(err(what))
            } else {
                u32::from_str_radix(t, 16).map_err(|_| err(what))
            }
        };
        let domain = match dom {
            Some(d) => hex(d, 4, "domain must be 1-4 hex digits")?,
            None => 0,
        };
        let bus = hex(bus, 2, "bus must be 1-2 hex digits")?;
        let device = hex(dev, 2, "device must be 1-2 hex digits")?;
        let function = hex(func, 1, "function must be one digit 0-7")?;
        if device > 31 {
            return Err(err("device number above 0x1f"));
        }
        if function > 7 {
            return Err(err("function number above 7"));
        }
        // The ranges were checked just above, so the narrowing casts are exact.
        Ok(
            Bdf::new(domain as u16, bus as u8, device as u8, function as u8)
                .expect("device and function were range-checked"),
        )
    }
}

impl serde::Serialize for Bdf {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Bdf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bdf, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        let b: Bdf = "0000:03:00.0".parse().unwrap();
        assert_eq!(
            (b.domain(), b.bus(), b.device(), b.function()),
            (0, 3, 0, 0)
        );
        assert_eq!(b.to_string(), "0000:03:00.0");
        let b: Bdf = "10ab:ff:1f.7".parse().unwrap();
        assert_eq!(
            (b.domain(), b.bus(), b.device(), b.function()),
            (0x10ab, 0xff, 0x1f, 7)
        );
        assert_eq!(b.devfn(), 0xff);
        assert_eq!(b.requester_id(), 0xffff);
        assert_eq!(b.to_string(), "10ab:ff:1f.7");
    }

    #[test]
    fn short_form_has_domain_zero() {
        let b: Bdf = "3:0.1".parse().unwrap();
        assert_eq!(b.to_string(), "0000:03:00.1");
    }

    #[test]
    fn bad_addresses_are_refused() {
        for bad in [
            "",
            "0000:03:00",
            "0000:03:20.0",
            "0000:03:00.8",
            "00000:03:00.0",
            "0000:003:00.0",
            "0000:03:00.0.1",
            "x:03:00.0",
            "0000:03:00.-1",
            "a:b:c:d.0",
            "0000:03:0g.0",
        ] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad} should not parse");
        }
        assert_eq!(Bdf::new(0, 0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 0, 8), None);
    }

    #[test]
    fn ordering_is_domain_bus_devfn() {
        let a: Bdf = "0000:01:1f.7".parse().unwrap();
        let b: Bdf = "0000:02:00.0".parse().unwrap();
        let c: Bdf = "0001:00:00.0".parse().unwrap();
        assert!(a < b && b < c);
    }
}
