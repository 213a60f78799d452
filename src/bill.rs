//! Billing arithmetic (rules layer): included quantities per subscription term, billing units with carried
//! remainders, thresholds. Pure: the journal reads the inputs and stores the [`Bill`] (`journal::billing`).
//!
//! Azure bills only the usage above what a plan includes, so the publisher must subtract the allowance itself.
//! meterd does it once per outbound event, in the same transaction that writes the event's frozen body (just
//! before its first send, when the plan is known):
//!
//! 1. The **term** holding the event's hour comes from the subscription list (`term.startDate` + `termUnit`,
//!    rolled forward or back in whole terms, so a renewal needs no new list), or, for resources without a term
//!    (managed applications), from `billing.fallback_term` (calendar months, UTC). A subscription listed
//!    without its term keeps the one meterd knew, and a listed term that starts later (a renewal into another
//!    term unit) replaces the running one only when it starts (`journal::outbound::store_subscriptions`).
//! 2. **Included quantity**: the term's consumption (per subscription, dimension, term and plan) draws the plan's
//!    allowance first; only the part above it is billable. The hour in which the allowance runs out bills just
//!    the excess. `"infinite"` never bills; a dimension a plan does not list includes nothing.
//!    **Plan change rule:** consumption is kept per plan, so a new plan mid-term starts from its own full
//!    allowance; usage already billed under the old plan stays billed.
//! 3. **Billing units**: with `unit = N`, the billable quantity plus the remainder carried from earlier hours is
//!    divided by N; whole units are sent, the rest is carried to the next hour of the same subscription and
//!    dimension (the `remainders` table), never billed early and never lost. If the event later expires, only
//!    what its whole units covered is carried (the remainder is already in the table); if it ends not billed
//!    (`rejected`, `not_active`, `skipped_unsubscribed`, `expired` without carrying), the remainder it took is
//!    given back (see `journal::outbound::settle`). So `units sent x unit + remainder == usage billed`, per
//!    subscription and dimension, after any sequence of outcomes (`tests/outcome_props.rs`). A remainder can be
//!    negative when a later hour already sent units built on the leftover of an hour that then ended not billed;
//!    nothing is sent until usage covers it.
//! 4. **Thresholds** (a percentage of the included quantity, or an absolute quantity) fire once per
//!    subscription, dimension and term when the consumption crosses them: a log event, a metric and an alert.
//!
//! An event whose billable quantity rounds to zero whole units is settled as `included` (within the allowance)
//! or `remainder` (below one unit, carried), without a marketplace call.

use crate::config::{Included, Threshold};
use chrono::{DateTime, Datelike, Months, Utc};

/// What billing decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    /// Quantity to send, micro-units of billing units (0: nothing to send).
    pub send: i64,
    /// Raw usage covered by the allowance.
    pub included: i64,
    /// Raw usage that was billable (overage + prebilled + remainder carried in).
    pub billable: i64,
    /// Remainder carried to the next hour, raw micro-units.
    pub remainder: i64,
    /// Term start, unix seconds.
    pub term_start: i64,
    /// Term end (exclusive), unix seconds.
    pub term_end: i64,
    /// Thresholds crossed by this event, as configured text.
    pub crossed: Vec<String>,
}

/// What the arithmetic of one event needs, read by the journal.
#[derive(Debug, Clone, Copy)]
pub struct BillInputs<'a> {
    /// The event's raw quantity, micro-units.
    pub raw: i64,
    /// Of which already billed (carried after an expiry), micro-units.
    pub prebilled: i64,
    /// The term's consumption (this resource, dimension and plan) before this event.
    pub consumed_before: i64,
    /// The remainder carried in from earlier hours.
    pub carried_in: i64,
    /// The plan's allowance for the dimension.
    pub included: Included,
    /// Usage per billing unit.
    pub unit: i64,
    /// The term `[start, end)`, unix seconds.
    pub term: (i64, i64),
    /// The dimension's thresholds.
    pub thresholds: &'a [Threshold],
}

/// A threshold this event's consumption crossed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// As configured (`80%`, `1000`).
    pub text: String,
    /// Its quantity, micro-units.
    pub value: i64,
}

/// The arithmetic of one event: the [`Bill`], and what the journal stores besides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Computed {
    /// The bill (`crossed` empty: the journal fills it with the crossings that fire for the first time).
    pub bill: Bill,
    /// Fresh usage added to the term's consumption (raw minus prebilled).
    pub fresh: i64,
    /// Of which above the allowance.
    pub overage: i64,
    /// The term's consumption after this event.
    pub consumed_after: i64,
    /// Whether the `remainders` row is written (billing units, or a remainder in or out).
    pub store_remainder: bool,
    /// Thresholds crossed (each fires once per term: the journal decides).
    pub crossings: Vec<Crossing>,
}

/// Applies the allowance, units and thresholds to an event's raw quantity; `None` when the term's consumption
/// would overflow.
pub fn compute(i: BillInputs<'_>) -> Option<Computed> {
    let fresh = i.raw - i.prebilled;
    let before = i.consumed_before;
    let after = before.checked_add(fresh)?;
    let overage = match i.included {
        Included::Infinite => 0,
        Included::Quantity(q) => (after - q).max(0) - (before - q).max(0),
    };
    let included_part = fresh - overage;
    let billable = overage + i.prebilled + i.carried_in;
    let (send, remainder) = units(billable, i.unit);
    let crossings = i
        .thresholds
        .iter()
        .filter_map(|t| {
            let value = threshold_value(*t, i.included)?;
            (before < value && after >= value).then(|| Crossing {
                text: t.to_string(),
                value,
            })
        })
        .collect();
    Some(Computed {
        bill: Bill {
            send,
            included: included_part,
            billable,
            remainder,
            term_start: i.term.0,
            term_end: i.term.1,
            crossed: Vec::new(),
        },
        fresh,
        overage,
        consumed_after: after,
        store_remainder: i.unit > 1 || i.carried_in != 0 || remainder != 0,
        crossings,
    })
}

/// Billing units of `billable` raw micro-units with `unit` usage per billed unit: (micro-units of billing units
/// to send, remainder carried, raw micro-units).
pub fn units(billable: i64, unit: i64) -> (i64, i64) {
    if billable <= 0 {
        // A negative remainder: an hour whose units were later given back (it ended not billed) after a later
        // hour had already sent units built on its leftover. Nothing is sent until usage covers it.
        (0, billable)
    } else if unit > 1 {
        let per_unit = unit * crate::quantity::MICROS;
        let whole = billable / per_unit;
        (whole * crate::quantity::MICROS, billable - whole * per_unit)
    } else {
        (billable, 0)
    }
}

/// Months in a term unit (`P1M`, `P1Y`, ... `P5Y`).
pub fn months_of(unit: &str) -> Option<u32> {
    match unit.trim() {
        "P1M" => Some(1),
        "P1Y" => Some(12),
        "P2Y" => Some(24),
        "P3Y" => Some(36),
        "P4Y" => Some(48),
        "P5Y" => Some(60),
        _ => None,
    }
}

fn add_months(anchor: DateTime<Utc>, months: i64) -> DateTime<Utc> {
    if months >= 0 {
        anchor
            .checked_add_months(Months::new(months as u32))
            .unwrap_or(anchor)
    } else {
        anchor
            .checked_sub_months(Months::new((-months) as u32))
            .unwrap_or(anchor)
    }
}

/// The term `[start, end)` of `months` months anchored at `anchor` that holds `at`.
pub fn term_around(
    anchor: DateTime<Utc>,
    months: u32,
    at: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let m = months.max(1) as i64;
    let diff = (at.year() as i64 - anchor.year() as i64) * 12
        + (at.month() as i64 - anchor.month() as i64);
    let mut k = diff.div_euclid(m);
    // Month arithmetic clamps days (Jan 31 + 1 month = Feb 28); step until the term holds `at`.
    while add_months(anchor, k * m) > at {
        k -= 1;
    }
    while add_months(anchor, (k + 1) * m) <= at {
        k += 1;
    }
    (add_months(anchor, k * m), add_months(anchor, (k + 1) * m))
}

fn threshold_value(t: Threshold, included: Included) -> Option<i64> {
    match (t, included) {
        (Threshold::Absolute(v), _) => Some(v),
        (Threshold::Percent(bp), Included::Quantity(q)) if q > 0 => {
            Some(((q as i128 * bp as i128) / 10_000) as i64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantity::MICROS;
    use proptest::prelude::*;

    const M: i64 = MICROS;

    /// One event of whole `raw` units (no prebilled part, no thresholds) in the term `(0, 1)`.
    fn event(
        raw: i64,
        consumed_before: i64,
        carried_in: i64,
        included: Included,
        unit: i64,
    ) -> Computed {
        compute(BillInputs {
            raw: raw * M,
            prebilled: 0,
            consumed_before: consumed_before * M,
            carried_in: carried_in * M,
            included,
            unit,
            term: (0, 1),
            thresholds: &[],
        })
        .unwrap()
    }

    #[test]
    fn scenario_12_allowance_crossing_then_new_term() {
        // docs/billing.md, scenario 12: gold includes 100 api_calls, 60 consumed before 09:00.
        let gold = Included::Quantity(100 * M);
        let nine = event(30, 60, 0, gold, 1);
        assert_eq!(
            (nine.bill.send, nine.bill.included, nine.overage),
            (0, 30 * M, 0)
        );
        assert_eq!(nine.consumed_after, 90 * M);
        let ten = event(25, 90, 0, gold, 1);
        assert_eq!(
            (ten.bill.send, ten.bill.included, ten.overage),
            (15 * M, 10 * M, 15 * M)
        );
        assert_eq!(ten.consumed_after, 115 * M);
        let eleven = event(5, 115, 0, gold, 1);
        assert_eq!((eleven.bill.send, eleven.bill.included), (5 * M, 0));
        assert_eq!(eleven.consumed_after, 120 * M);
        // 2026-04-01: a new term, its consumption starts from zero.
        let april = event(50, 0, 0, gold, 1);
        assert_eq!((april.bill.send, april.bill.included), (0, 50 * M));
        assert_eq!(april.consumed_after, 50 * M);
        assert!(!april.store_remainder);
    }

    #[test]
    fn scenario_13_billing_units_carry_the_remainder() {
        // docs/billing.md, scenario 13: unit = 1200 s, nothing included.
        let none = Included::Quantity(0);
        let first = event(3000, 0, 0, none, 1200);
        assert_eq!((first.bill.send, first.bill.remainder), (2 * M, 600 * M));
        assert!(first.store_remainder);
        let second = event(700, 3000, 600, none, 1200);
        assert_eq!(second.bill.billable, 1300 * M);
        assert_eq!((second.bill.send, second.bill.remainder), (M, 100 * M));
        // An hour with no usage sends nothing; the 100 s stay carried.
        let third = event(0, 3700, 100, none, 1200);
        assert_eq!((third.bill.send, third.bill.remainder), (0, 100 * M));
        assert!(third.store_remainder);
    }

    #[test]
    fn infinite_never_bills_and_zero_bills_everything() {
        let inf = event(1_000_000, 5_000_000, 0, Included::Infinite, 1);
        assert_eq!(
            (inf.bill.send, inf.overage, inf.bill.included),
            (0, 0, 1_000_000 * M)
        );
        let zero = event(7, 0, 0, Included::Quantity(0), 1);
        assert_eq!(
            (zero.bill.send, zero.overage, zero.bill.included),
            (7 * M, 7 * M, 0)
        );
        assert_eq!(zero.bill.remainder, 0);
    }

    proptest! {
        #[test]
        fn units_and_remainder_add_up_to_usage_billed_after_the_allowance(
            usage in proptest::collection::vec(0i64..5_000 * M, 0..40),
            included in prop_oneof![Just(None), (0i64..20_000 * M).prop_map(Some)],
            unit in prop_oneof![Just(1i64), 1i64..2_000],
        ) {
            let allowance = included.map_or(Included::Infinite, Included::Quantity);
            let (mut consumed, mut carried, mut sent, mut billed) = (0i64, 0i64, 0i64, 0i64);
            for raw in &usage {
                let c = compute(BillInputs {
                    raw: *raw,
                    prebilled: 0,
                    consumed_before: consumed,
                    carried_in: carried,
                    included: allowance,
                    unit,
                    term: (0, 1),
                    thresholds: &[],
                })
                .unwrap();
                prop_assert_eq!(c.bill.included + c.overage, *raw);
                // The allowance is drawn before anything is billed.
                match included {
                    None => prop_assert_eq!(c.overage, 0),
                    Some(q) => {
                        prop_assert_eq!(c.bill.included, (*raw).min((q - consumed).max(0)));
                        if c.overage > 0 {
                            prop_assert!(consumed + c.bill.included >= q);
                        }
                    }
                }
                prop_assert!(c.bill.send >= 0);
                if unit > 1 {
                    // Whole units only; the rest (less than one unit) is carried.
                    prop_assert_eq!(c.bill.send % M, 0);
                    prop_assert!((0..unit * M).contains(&c.bill.remainder));
                } else {
                    prop_assert_eq!(c.bill.remainder, 0);
                }
                consumed = c.consumed_after;
                carried = c.bill.remainder;
                sent += c.bill.send;
                billed += c.overage;
            }
            // units x unit + remainder == usage billed (`send` is in micro-units of billing units).
            prop_assert_eq!(sent * unit + carried, billed);
            let total: i64 = usage.iter().sum();
            match included {
                None => prop_assert_eq!(billed, 0),
                Some(q) => prop_assert_eq!(billed, (total - q).max(0)),
            }
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn terms_roll_forward_and_back_from_the_anchor() {
        let anchor = t("2026-01-31T00:00:00Z");
        let (s, e) = term_around(anchor, 1, t("2026-03-10T09:00:00Z"));
        assert_eq!(
            (s, e),
            (t("2026-02-28T00:00:00Z"), t("2026-03-31T00:00:00Z"))
        );
        let (s, e) = term_around(t("2026-03-01T00:00:00Z"), 1, t("2026-03-10T09:00:00Z"));
        assert_eq!(
            (s, e),
            (t("2026-03-01T00:00:00Z"), t("2026-04-01T00:00:00Z"))
        );
        let (s, e) = term_around(t("2026-03-01T00:00:00Z"), 12, t("2025-12-31T23:00:00Z"));
        assert_eq!(
            (s, e),
            (t("2025-03-01T00:00:00Z"), t("2026-03-01T00:00:00Z"))
        );
        let (s, _) = term_around(t("2024-06-15T00:00:00Z"), 36, t("2026-03-10T00:00:00Z"));
        assert_eq!(s, t("2024-06-15T00:00:00Z"));
        let (s, e) = term_around(t("1970-01-01T00:00:00Z"), 1, t("2026-03-31T23:59:59Z"));
        assert_eq!(
            (s, e),
            (t("2026-03-01T00:00:00Z"), t("2026-04-01T00:00:00Z"))
        );
    }
}
