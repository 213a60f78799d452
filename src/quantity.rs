//! Quantities as exact scaled integers.
//!
//! A quantity is kept as micro-units in an `i64` (`1.5` is `1_500_000`), so sums are exact and never drift the
//! way `f64` accumulation does. Parsing works on the decimal text as the client sent it, not on a float, so
//! `0.1` is exactly `100_000` micro-units and a seventh decimal is an error instead of a silent rounding.
//!
//! The wire form: the marketplace API takes a JSON number. Printing it from the integer (never through `f64`) keeps
//! the frozen bytes exact and stable: `2500000` is always `2.5`, never `2.4999999999999996`. Numbers coming back (a
//! duplicate's accepted quantity) are `f64` and are rounded to the nearest micro-unit before comparing.

use std::fmt;

/// Micro-units per unit.
pub const MICROS: i64 = 1_000_000;

/// The largest quantity one record may carry (10^9 units). Bigger values are almost certainly a bug in the
/// caller (bytes reported as gigabytes, a timestamp in the quantity field), and the marketplace takes a double.
pub const MAX_RECORD_UNITS: i64 = 1_000_000_000;

/// A quantity in micro-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Micros(pub i64);

/// Why a quantity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a decimal number at all (`"abc"`, `NaN`, `Infinity`).
    #[error("must be a finite decimal number, like 1 or 2.5")]
    NotANumber,
    /// Zero or negative.
    #[error("must be greater than 0")]
    NotPositive,
    /// More than six decimals.
    #[error("has more than 6 decimals; meterd counts in millionths")]
    TooPrecise,
    /// Above [`MAX_RECORD_UNITS`].
    #[error("is larger than 1000000000 (10^9) for one record; split it or check the unit")]
    TooLarge,
}

impl Micros {
    /// Parses a decimal literal (`12`, `2.5`, `1e3`, `-1`), exactly.
    pub fn parse_decimal(text: &str) -> Result<Micros, QuantityError> {
        let t = text.trim();
        let (negative, body) = match t.as_bytes().first() {
            Some(b'-') => (true, &t[1..]),
            Some(b'+') => (false, &t[1..]),
            _ => (false, t),
        };
        let (mantissa, exponent) = match body.find(['e', 'E']) {
            Some(i) => {
                let e: i32 = body[i + 1..]
                    .parse()
                    .map_err(|_| QuantityError::NotANumber)?;
                (&body[..i], e)
            }
            None => (body, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((a, b)) => (a, b),
            None => (mantissa, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty())
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(QuantityError::NotANumber);
        }
        // value = digits * 10^(exponent - frac_len); we want value * 10^6.
        // The digits of `int_part` then `frac_part`; an integer (most quantities) is read where it stands.
        let joined: std::borrow::Cow<str> = if frac_part.is_empty() {
            int_part.into()
        } else {
            let mut d = String::with_capacity(int_part.len() + frac_part.len());
            d.push_str(int_part);
            d.push_str(frac_part);
            d.into()
        };
        let digits = joined.trim_start_matches('0');
        let scale = exponent as i64 - frac_part.len() as i64 + 6;
        if digits.is_empty() {
            return Err(QuantityError::NotPositive);
        }
        if negative {
            return Err(QuantityError::NotPositive);
        }
        let trailing_zeros = digits.len() - digits.trim_end_matches('0').len();
        let significant = digits.trim_end_matches('0');
        let scale = scale + trailing_zeros as i64;
        if scale < 0 {
            return Err(QuantityError::TooPrecise);
        }
        if significant.len() as i64 + scale > 19 {
            return Err(QuantityError::TooLarge);
        }
        let base: i128 = significant.parse().map_err(|_| QuantityError::NotANumber)?;
        let value = base * 10i128.pow(scale as u32);
        if value > (MAX_RECORD_UNITS as i128) * (MICROS as i128) {
            return Err(QuantityError::TooLarge);
        }
        Ok(Micros(value as i64))
    }

    /// The quantity as the shortest exact decimal (`4`, `2.5`, `0.000001`).
    pub fn to_decimal_string(self) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        // unsigned_abs keeps i64::MIN printable.
        let abs = self.0.unsigned_abs();
        let units = abs / MICROS as u64;
        let frac = abs % MICROS as u64;
        if frac == 0 {
            format!("{sign}{units}")
        } else {
            let digits = format!("{frac:06}");
            format!("{sign}{units}.{}", digits.trim_end_matches('0'))
        }
    }

    /// A decimal quantity from the wire (a double), rounded to the nearest micro-unit.
    ///
    /// `None` for NaN, infinities and values outside the `i64` range.
    pub fn from_f64_rounded(value: f64) -> Option<Micros> {
        if !value.is_finite() {
            return None;
        }
        let scaled = (value * MICROS as f64).round();
        // i64::MAX as f64 rounds up to 2^63, which is out of range: compare with a strict upper bound.
        if scaled >= -(i64::MIN as f64) || scaled < i64::MIN as f64 {
            return None;
        }
        Some(Micros(scaled as i64))
    }

    /// The quantity as a float, for the JSON sent to the marketplace (which takes a double).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / MICROS as f64
    }
}

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_decimal_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Micros::parse_decimal("1"), Ok(Micros(1_000_000)));
        assert_eq!(Micros::parse_decimal("2.5"), Ok(Micros(2_500_000)));
        assert_eq!(Micros::parse_decimal("0.1"), Ok(Micros(100_000)));
        assert_eq!(Micros::parse_decimal("0.000001"), Ok(Micros(1)));
        assert_eq!(Micros::parse_decimal("1.500000"), Ok(Micros(1_500_000)));
        assert_eq!(Micros::parse_decimal("1e3"), Ok(Micros(1_000_000_000)));
        assert_eq!(Micros::parse_decimal("25E-1"), Ok(Micros(2_500_000)));
        assert_eq!(
            Micros::parse_decimal("1000000000"),
            Ok(Micros(MAX_RECORD_UNITS * MICROS))
        );
    }

    #[test]
    fn refuses_bad_quantities() {
        assert_eq!(Micros::parse_decimal("0"), Err(QuantityError::NotPositive));
        assert_eq!(
            Micros::parse_decimal("0.0"),
            Err(QuantityError::NotPositive)
        );
        assert_eq!(Micros::parse_decimal("-1"), Err(QuantityError::NotPositive));
        assert_eq!(
            Micros::parse_decimal("0.0000001"),
            Err(QuantityError::TooPrecise)
        );
        assert_eq!(
            Micros::parse_decimal("1e-7"),
            Err(QuantityError::TooPrecise)
        );
        assert_eq!(
            Micros::parse_decimal("1000000000.5"),
            Err(QuantityError::TooLarge)
        );
        assert_eq!(Micros::parse_decimal("1e300"), Err(QuantityError::TooLarge));
        assert_eq!(
            Micros::parse_decimal("99999999999999999999999"),
            Err(QuantityError::TooLarge)
        );
        for bad in [
            "NaN",
            "Infinity",
            "-Infinity",
            "",
            ".",
            "1.2.3",
            "abc",
            "1e",
            "0x10",
            "1_000",
        ] {
            assert_eq!(
                Micros::parse_decimal(bad),
                Err(QuantityError::NotANumber),
                "{bad}"
            );
        }
    }

    #[test]
    fn formats_shortest_exact() {
        assert_eq!(Micros(4_000_000).to_decimal_string(), "4");
        assert_eq!(Micros(2_500_000).to_decimal_string(), "2.5");
        assert_eq!(Micros(1).to_decimal_string(), "0.000001");
        assert_eq!(Micros(12_345_678).to_decimal_string(), "12.345678");
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(m in 1i64..=MAX_RECORD_UNITS * MICROS) {
            let s = Micros(m).to_decimal_string();
            prop_assert_eq!(Micros::parse_decimal(&s), Ok(Micros(m)));
            // The float the marketplace receives prints back to the same decimal.
            let f: f64 = Micros(m).as_f64();
            prop_assert_eq!(Micros::parse_decimal(&format!("{f}")), Ok(Micros(m)));
        }
    }

    #[test]
    fn prints_exact_decimals() {
        assert_eq!(Micros(4_000_000).to_decimal_string(), "4");
        assert_eq!(Micros(2_500_000).to_decimal_string(), "2.5");
        assert_eq!(Micros(1).to_decimal_string(), "0.000001");
        assert_eq!(Micros(0).to_decimal_string(), "0");
        assert_eq!(Micros(12_345_678).to_decimal_string(), "12.345678");
        assert_eq!(Micros(100_000).to_decimal_string(), "0.1");
        assert_eq!(Micros(-1_500_000).to_decimal_string(), "-1.5");
        assert_eq!(
            Micros(i64::MIN).to_decimal_string(),
            "-9223372036854.775808"
        );
    }

    #[test]
    fn converts_floats_to_nearest_micro() {
        assert_eq!(Micros::from_f64_rounded(12.5), Some(Micros(12_500_000)));
        assert_eq!(Micros::from_f64_rounded(0.000001), Some(Micros(1)));
        assert_eq!(Micros::from_f64_rounded(0.1 + 0.2), Some(Micros(300_000)));
        assert_eq!(Micros::from_f64_rounded(2.0000004), Some(Micros(2_000_000)));
        assert_eq!(Micros::from_f64_rounded(2.0000006), Some(Micros(2_000_001)));
        assert_eq!(Micros::from_f64_rounded(-3.0), Some(Micros(-3_000_000)));
        assert_eq!(Micros::from_f64_rounded(f64::NAN), None);
        assert_eq!(Micros::from_f64_rounded(f64::INFINITY), None);
        assert_eq!(Micros::from_f64_rounded(1e300), None);
    }

    #[test]
    fn round_trips_through_the_printed_decimal() {
        for micros in [1_i64, 7, 999_999, 1_000_001, 20_500_000, 123_456_789_012] {
            let printed = Micros(micros).to_decimal_string();
            let parsed: f64 = printed.parse().expect("a decimal");
            assert_eq!(
                Micros::from_f64_rounded(parsed),
                Some(Micros(micros)),
                "{printed}"
            );
        }
    }
}
