//! Exact conversions between micro-units and the decimals the marketplace takes.
//!
//! meterd adds quantities up as `i64` micro-units (one unit = 1 000 000) so sums are exact. The API takes a JSON
//! number; printing it from the integer (never through `f64`) keeps the frozen bytes exact and stable: `2500000`
//! is always `2.5`, never `2.4999999999999996`. Numbers coming back (a duplicate's accepted quantity) are `f64`
//! and are rounded to the nearest micro-unit before comparing.

/// Micro-units per unit.
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// Prints `micros` as the shortest exact decimal: `4000000` -> `4`, `2500000` -> `2.5`, `1` -> `0.000001`.
pub fn micros_to_decimal_string(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    // unsigned_abs keeps i64::MIN printable.
    let abs = micros.unsigned_abs();
    let units = abs / MICROS_PER_UNIT as u64;
    let frac = abs % MICROS_PER_UNIT as u64;
    if frac == 0 {
        format!("{sign}{units}")
    } else {
        let digits = format!("{frac:06}");
        format!("{sign}{units}.{}", digits.trim_end_matches('0'))
    }
}

/// Converts a decimal quantity to micro-units, rounding to the nearest micro-unit.
///
/// `None` for NaN, infinities and values outside the `i64` range.
pub fn f64_to_micros(value: f64) -> Option<i64> {
    if !value.is_finite() {
        return None;
    }
    let scaled = (value * MICROS_PER_UNIT as f64).round();
    // i64::MAX as f64 rounds up to 2^63, which is out of range: compare with a strict upper bound.
    if scaled >= -(i64::MIN as f64) || scaled < i64::MIN as f64 {
        return None;
    }
    Some(scaled as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_exact_decimals() {
        assert_eq!(micros_to_decimal_string(4_000_000), "4");
        assert_eq!(micros_to_decimal_string(2_500_000), "2.5");
        assert_eq!(micros_to_decimal_string(1), "0.000001");
        assert_eq!(micros_to_decimal_string(0), "0");
        assert_eq!(micros_to_decimal_string(12_345_678), "12.345678");
        assert_eq!(micros_to_decimal_string(100_000), "0.1");
        assert_eq!(micros_to_decimal_string(-1_500_000), "-1.5");
        assert_eq!(micros_to_decimal_string(i64::MIN), "-9223372036854.775808");
    }

    #[test]
    fn converts_floats_to_nearest_micro() {
        assert_eq!(f64_to_micros(12.5), Some(12_500_000));
        assert_eq!(f64_to_micros(0.000001), Some(1));
        assert_eq!(f64_to_micros(0.1 + 0.2), Some(300_000));
        assert_eq!(f64_to_micros(2.0000004), Some(2_000_000));
        assert_eq!(f64_to_micros(2.0000006), Some(2_000_001));
        assert_eq!(f64_to_micros(-3.0), Some(-3_000_000));
        assert_eq!(f64_to_micros(f64::NAN), None);
        assert_eq!(f64_to_micros(f64::INFINITY), None);
        assert_eq!(f64_to_micros(1e300), None);
    }

    #[test]
    fn round_trips_through_the_printed_decimal() {
        for micros in [1_i64, 7, 999_999, 1_000_001, 20_500_000, 123_456_789_012] {
            let printed = micros_to_decimal_string(micros);
            let parsed: f64 = printed.parse().expect("a decimal");
            assert_eq!(f64_to_micros(parsed), Some(micros), "{printed}");
        }
    }
}
