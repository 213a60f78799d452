//! Credit pools (rules layer): what covers usage before anything is billed.
//!
//! A pool is a quantity of one dimension (or `infinite`) that usage draws from before it is billed: a free tier,
//! a prepaid block, promotional credit, and the plan's included quantity per term (the pool `plan:<plan>`, which
//! every subscription has, so a configuration without `[[pools]]` bills exactly as before). Pure: the journal reads
//! the pools, their periods' draws and the event's records, and stores the draws (`journal::pools`).
//!
//! # The rules
//!
//! 1. **Which pools apply.** A pool applies to an event when its dimension is the event's and its scope holds the
//!    event's subscription: `resource` (that subscription), `customer` (every subscription whose SaaS listing
//!    names that `beneficiary.tenantId`), or `group` (every subscription of a `[[groups]]` entry). A voided pool
//!    takes no further draws; what it drew stays drawn.
//! 2. **Draw order.** Ascending `priority`; ties: the pool that expires first (a pool without expiry last), then
//!    the id (byte order). The plan pool has the priority `billing.plan_pool_priority` (default 100) and no expiry
//!    within its term.
//! 3. **Windows.** A pool covers usage in `[effective_at, expires_at)`. Within an hour the draw uses the times of
//!    the records counted in it: records in time order (ties in journal order), each drawing from the pools whose
//!    window holds its time, in draw order. A record carried into the hour from an earlier one counts at the
//!    hour's start; usage the journal has no record of (compacted) counts at the hour's start too. Nothing is
//!    prorated: a pool that expires at 10:30 covers the records up to 10:29:59 and none after.
//! 4. **Periods and refresh.** A pool without `refresh` has one period, its whole life. `refresh = "month"`
//!    starts a new period on the first of each UTC calendar month, `"term"` at each term of the subscription
//!    (resource scope only). Each period makes `amount` available; with `rollover` the unused part of the
//!    previous period is added (at most `rollover_cap`, when set).
//! 5. **What remains.** Usage no pool covers is the overage; with the carried remainder it goes through billing
//!    units (`bill::units`). Already billed usage (carried after an expiry) draws from no pool.
//!
//! So, per event: the draws plus the overage equal the fresh usage, no pool goes below zero, and the pools'
//! balances are their periods' amounts minus the draws recorded (replaying the draws gives the balances).

use crate::bill::{BillInputs, Computed, compute, units};
use crate::config::Included;
use std::cmp::Ordering;

pub use crate::pool_def::{
    Amount, AmountSpec, Every, PLAN_POOL_PREFIX, PoolDef, PoolSpec, Refresh, RefreshSpec, Scope,
    ScopeSpec, month_start, next_month_start,
};

/// The id of the plan pool of `plan`.
pub fn plan_pool_id(plan: &str) -> String {
    format!("{PLAN_POOL_PREFIX}{plan}")
}

/// One pool as it stands for one event: its window, what its period makes available and what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    /// Pool id.
    pub id: String,
    /// Draw order: lower first.
    pub priority: i64,
    /// Covers usage from this time.
    pub effective_at: i64,
    /// Covers usage before this time, if set.
    pub expires_at: Option<i64>,
    /// The period's start (draws are recorded against it).
    pub period_start: i64,
    /// What the period makes available.
    pub total: Amount,
    /// What is left of it.
    pub left: Amount,
}

impl From<Included> for Amount {
    fn from(i: Included) -> Self {
        match i {
            Included::Quantity(q) => Amount::Quantity(q),
            Included::Infinite => Amount::Infinite,
        }
    }
}

/// The draw order: priority, then the earliest expiry (none last), then the id.
pub fn draw_order(a: &Available, b: &Available) -> Ordering {
    a.priority
        .cmp(&b.priority)
        .then_with(|| match (a.expires_at, b.expires_at) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        })
        .then_with(|| a.id.cmp(&b.id))
}

/// What one pool covered of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    /// Pool id.
    pub id: String,
    /// The pool's period (unix seconds of its start).
    pub period_start: i64,
    /// Quantity covered, micro-units.
    pub quantity: i64,
}

/// Draws `usage` (time, quantity) from `pools` (rules 2 and 3): records in time order, each from the pools whose
/// window holds its time, in draw order. Returns the draws (only those above zero) in draw order; `pools` is left
/// with what remains.
pub fn draw(usage: &[(i64, i64)], pools: &mut [Available]) -> Vec<Draw> {
    pools.sort_by(draw_order);
    let mut chunks: Vec<(usize, i64, i64)> = usage
        .iter()
        .enumerate()
        .map(|(i, (t, q))| (i, *t, *q))
        .collect();
    chunks.sort_by_key(|(i, t, _)| (*t, *i));
    let mut drawn = vec![0i64; pools.len()];
    for (_, at, qty) in chunks {
        let mut rest = qty.max(0);
        for (k, p) in pools.iter_mut().enumerate() {
            if rest == 0 {
                break;
            }
            if at < p.effective_at || p.expires_at.is_some_and(|e| at >= e) {
                continue;
            }
            let take = match p.left {
                Amount::Infinite => rest,
                Amount::Quantity(l) => rest.min(l.max(0)),
            };
            if take > 0 {
                if let Amount::Quantity(l) = &mut p.left {
                    *l -= take;
                }
                drawn[k] += take;
                rest -= take;
            }
        }
    }
    pools
        .iter()
        .zip(drawn)
        .filter(|(_, q)| *q > 0)
        .map(|(p, quantity)| Draw {
            id: p.id.clone(),
            period_start: p.period_start,
            quantity,
        })
        .collect()
}

/// A pool threshold crossed by an event: `80%` of its period's total, or `exhausted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCrossing {
    /// Pool id.
    pub id: String,
    /// The period (unix seconds of its start): each crossing fires once per pool and period.
    pub period_start: i64,
    /// `80%` or `exhausted`.
    pub text: String,
    /// Used in the period after the event, micro-units.
    pub used: i64,
    /// The period's total, micro-units.
    pub total: i64,
}

/// What billing an event through its pools decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooled {
    /// The plan allowance's arithmetic with the other pools' draws applied: `bill.included` is everything the
    /// pools covered (the plan's part and the others'), `overage` what none covered, `fresh` the usage that
    /// reached the plan pool (the term's consumption), `bill.send`/`remainder` the units of what remains.
    pub computed: Computed,
    /// Every pool's draw, the plan pool's included, in draw order.
    pub draws: Vec<Draw>,
    /// Pool thresholds crossed (each fires once per pool and period: the journal decides).
    pub crossings: Vec<PoolCrossing>,
}

/// Bills one event through its pools: `pools` (without the plan pool) and the plan allowance of `bill`, drawn in
/// order over `usage` (time, quantity; it sums to the event's fresh usage, `raw - prebilled`); what none covers
/// goes through billing units. `percents` are the dimension's percentage thresholds (hundredths of a percent),
/// applied to each finite pool's period total besides `exhausted`. With no pools the result is exactly
/// [`compute`]'s. `None` when the term's consumption would overflow.
pub fn bill_event(
    bill: BillInputs<'_>,
    usage: &[(i64, i64)],
    pools: &[Available],
    plan_pool: (&str, i64),
    percents: &[i64],
) -> Option<Pooled> {
    let plan_left = match bill.included {
        Included::Infinite => Amount::Infinite,
        Included::Quantity(q) => Amount::Quantity((q - bill.consumed_before).max(0)),
    };
    let mut all: Vec<Available> = pools.to_vec();
    all.push(Available {
        id: plan_pool.0.to_string(),
        priority: plan_pool.1,
        effective_at: i64::MIN,
        expires_at: None,
        period_start: bill.term.0,
        total: bill.included.into(),
        left: plan_left,
    });
    let before: Vec<Available> = {
        let mut b = all.clone();
        b.sort_by(draw_order);
        b
    };
    let draws = draw(usage, &mut all);
    let plan_pos = all.iter().position(|p| p.id == plan_pool.0)?;
    let drawn_of = |id: &str| draws.iter().find(|d| d.id == id).map_or(0, |d| d.quantity);
    let pre: i64 = all[..plan_pos].iter().map(|p| drawn_of(&p.id)).sum();
    let post: i64 = all[plan_pos + 1..].iter().map(|p| drawn_of(&p.id)).sum();
    let mut computed = compute(BillInputs {
        raw: bill.raw - pre,
        ..bill
    })?;
    if pre != 0 || post != 0 {
        let overage = computed.overage - post;
        let billable = overage + bill.prebilled + bill.carried_in;
        let (send, remainder) = units(billable, bill.unit);
        computed.overage = overage;
        computed.bill.included += pre + post;
        computed.bill.billable = billable;
        computed.bill.send = send;
        computed.bill.remainder = remainder;
        computed.store_remainder = bill.unit > 1 || bill.carried_in != 0 || remainder != 0;
    }
    let mut crossings = Vec::new();
    for (p, after) in before.iter().zip(all.iter()) {
        if p.id == plan_pool.0 {
            continue;
        }
        let (Amount::Quantity(total), Amount::Quantity(l0), Amount::Quantity(l1)) =
            (p.total, p.left, after.left)
        else {
            continue;
        };
        if l1 == l0 {
            continue;
        }
        let (used0, used1) = (total - l0, total - l1);
        for bp in percents {
            let value = ((total as i128 * *bp as i128) / 10_000) as i64;
            if total > 0 && used0 < value && used1 >= value {
                crossings.push(PoolCrossing {
                    id: p.id.clone(),
                    period_start: p.period_start,
                    text: crate::config::Threshold::Percent(*bp).to_string(),
                    used: used1,
                    total,
                });
            }
        }
        if l1 <= 0 && l0 > 0 {
            crossings.push(PoolCrossing {
                id: p.id.clone(),
                period_start: p.period_start,
                text: "exhausted".into(),
                used: used1,
                total,
            });
        }
    }
    Some(Pooled {
        computed,
        draws,
        crossings,
    })
}

/// Whether a pool that expires at `expires_at` with `left` of `total` unused at `now` is due its expiry warning:
/// it expires within `warn_within` seconds and at least `unused_bp` hundredths of a percent of `total` is unused.
pub fn expiry_warning_due(
    now: i64,
    expires_at: i64,
    total: i64,
    left: i64,
    warn_within: i64,
    unused_bp: i64,
) -> bool {
    now < expires_at
        && expires_at - now <= warn_within
        && total > 0
        && (left as i128) * 10_000 >= (total as i128) * (unused_bp as i128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantity::MICROS;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const M: i64 = MICROS;

    fn pool(id: &str, priority: i64, expires_at: Option<i64>, left: Amount) -> Available {
        Available {
            id: id.into(),
            priority,
            effective_at: i64::MIN,
            expires_at,
            period_start: 0,
            total: left,
            left,
        }
    }

    fn inputs(raw: i64, included: Included, unit: i64) -> BillInputs<'static> {
        BillInputs {
            raw,
            prebilled: 0,
            consumed_before: 0,
            carried_in: 0,
            included,
            unit,
            term: (0, 1),
            thresholds: &[],
        }
    }

    #[test]
    fn specs_validate_with_messages_naming_the_field() {
        let spec: PoolSpec = serde_json::from_value(serde_json::json!({
            "id": "prepaid-1", "dimension": "api_calls", "amount": "60000", "priority": 2,
            "scope": {"customer": "BBBB"}, "effective_at": "2026-03-01T00:00:00Z",
            "expires_at": "2026-03-31T00:00:00Z", "refresh": {"every": "month", "rollover": true, "cap": 10}
        }))
        .unwrap();
        let def = spec.validate().unwrap();
        assert_eq!(def.amount, Amount::Quantity(60_000 * M));
        assert_eq!(def.scope, Scope::Customer("bbbb".into()));
        assert_eq!(def.refresh.unwrap().cap, Some(10 * M));
        assert_eq!(def.to_json()["amount"], "60000");
        let mut bad = spec.clone();
        bad.id = "plan:gold".into();
        assert!(bad.validate().unwrap_err().contains("plan allowance"));
        let mut bad = spec.clone();
        bad.refresh = Some(RefreshSpec {
            every: "term".into(),
            rollover: false,
            cap: None,
        });
        assert!(bad.validate().unwrap_err().contains("resource"));
        let mut bad = spec;
        bad.expires_at = Some("yesterday".into());
        assert!(bad.validate().unwrap_err().contains("expires_at"));
    }

    #[test]
    fn order_is_priority_then_earliest_expiry_then_id() {
        let mut pools = [
            pool("z", 1, None, Amount::Quantity(M)),
            pool("b", 1, Some(50), Amount::Quantity(M)),
            pool("a", 1, Some(50), Amount::Quantity(M)),
            pool("c", 1, Some(10), Amount::Quantity(M)),
            pool("free", 0, None, Amount::Quantity(M)),
        ];
        pools.sort_by(draw_order);
        let ids: Vec<&str> = pools.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["free", "c", "a", "b", "z"]);
    }

    #[test]
    fn a_pool_expiring_mid_hour_covers_only_the_records_before_its_expiry() {
        // Records at :10 (4), :20 (3), :40 (5); the prepaid pool (10 left) expires at :30.
        let usage = [(600, 4 * M), (2400, 5 * M), (1200, 3 * M)];
        let mut pools = vec![pool("prepaid", 1, Some(1800), Amount::Quantity(10 * M))];
        let draws = draw(&usage, &mut pools);
        assert_eq!(draws[0].quantity, 7 * M);
        assert_eq!(pools[0].left, Amount::Quantity(3 * M));
    }

    #[test]
    fn free_tier_then_prepaid_then_plan_then_overage_with_units() {
        // 100 used: free tier 10, prepaid 30 (priority 1), plan 50 (priority 100), 10 over; unit 3: 3 units, 1 left.
        let pools = [
            pool("free", 0, None, Amount::Quantity(10 * M)),
            pool("prepaid", 1, Some(99), Amount::Quantity(30 * M)),
        ];
        let p = bill_event(
            inputs(100 * M, Included::Quantity(50 * M), 3),
            &[(0, 100 * M)],
            &pools,
            ("plan:gold", 100),
            &[8000],
        )
        .unwrap();
        let got: Vec<(&str, i64)> = p
            .draws
            .iter()
            .map(|d| (d.id.as_str(), d.quantity / M))
            .collect();
        assert_eq!(got, [("free", 10), ("prepaid", 30), ("plan:gold", 50)]);
        assert_eq!(p.computed.bill.included, 90 * M);
        assert_eq!(p.computed.overage, 10 * M);
        assert_eq!(
            (p.computed.bill.send, p.computed.bill.remainder),
            (3 * M, M)
        );
        // The plan's consumption counts only what reached it.
        assert_eq!(p.computed.fresh, 60 * M);
        let texts: Vec<(&str, &str)> = p
            .crossings
            .iter()
            .map(|c| (c.id.as_str(), c.text.as_str()))
            .collect();
        assert_eq!(
            texts,
            [
                ("free", "80%"),
                ("free", "exhausted"),
                ("prepaid", "80%"),
                ("prepaid", "exhausted")
            ]
        );
    }

    #[test]
    fn a_pool_after_the_plan_takes_only_what_the_plan_leaves() {
        let pools = [pool("flex", 200, None, Amount::Quantity(5 * M))];
        let p = bill_event(
            inputs(20 * M, Included::Quantity(12 * M), 1),
            &[(0, 20 * M)],
            &pools,
            ("plan:gold", 100),
            &[],
        )
        .unwrap();
        assert_eq!(p.computed.fresh, 20 * M);
        assert_eq!(p.computed.consumed_after, 20 * M);
        assert_eq!(p.computed.bill.send, 3 * M);
        assert_eq!(p.computed.bill.included, 17 * M);
    }

    #[test]
    fn monthly_refresh_rolls_over_up_to_the_cap() {
        let jan = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp();
        let feb = next_month_start(jan);
        let mar = next_month_start(feb);
        let mut def = PoolDef {
            id: "monthly".into(),
            dimension: "api_calls".into(),
            amount: Amount::Quantity(100 * M),
            priority: 0,
            scope: Scope::Resource("r".into()),
            effective_at: jan,
            expires_at: None,
            refresh: Some(Refresh {
                every: Every::Month,
                rollover: false,
                cap: None,
            }),
        };
        let term = |_: i64| (0, 1);
        let drawn = BTreeMap::from([(jan, 30 * M), (feb, 90 * M)]);
        assert_eq!(def.period_at(feb + 5, &term), (feb, mar));
        assert_eq!(def.allotment(feb, &drawn, &term), Amount::Quantity(100 * M));
        def.refresh = Some(Refresh {
            every: Every::Month,
            rollover: true,
            cap: None,
        });
        // January leaves 70; February has 170 and uses 90: March has 100 + 80.
        assert_eq!(def.allotment(feb, &drawn, &term), Amount::Quantity(170 * M));
        assert_eq!(def.allotment(mar, &drawn, &term), Amount::Quantity(180 * M));
        def.refresh = Some(Refresh {
            every: Every::Month,
            rollover: true,
            cap: Some(50 * M),
        });
        assert_eq!(def.allotment(feb, &drawn, &term), Amount::Quantity(150 * M));
        assert_eq!(def.allotment(mar, &drawn, &term), Amount::Quantity(150 * M));
    }

    #[test]
    fn expiry_warning_is_due_within_the_window_with_enough_unused() {
        let day = 86_400;
        assert!(expiry_warning_due(0, 7 * day, 100, 40, 7 * day, 4000));
        assert!(!expiry_warning_due(0, 7 * day + 1, 100, 40, 7 * day, 4000));
        assert!(!expiry_warning_due(0, 7 * day, 100, 39, 7 * day, 4000));
        assert!(!expiry_warning_due(
            7 * day,
            7 * day,
            100,
            100,
            7 * day,
            4000
        ));
    }

    fn amount() -> impl Strategy<Value = Amount> {
        prop_oneof![
            1 => Just(Amount::Infinite),
            6 => (0i64..3_000 * M).prop_map(Amount::Quantity),
        ]
    }

    proptest! {
        /// With no pools but the plan, billing is exactly the plan allowance's arithmetic of `bill::compute`.
        #[test]
        fn no_pools_is_exactly_the_plan_allowance(
            raw in 0i64..5_000 * M,
            prebilled_part in 0i64..100,
            consumed_before in 0i64..5_000 * M,
            carried_in in -1_000 * M..1_000 * M,
            included in prop_oneof![Just(None), (0i64..5_000 * M).prop_map(Some)],
            unit in prop_oneof![Just(1i64), 1i64..2_000],
        ) {
            let prebilled = raw / 100 * prebilled_part;
            let i = BillInputs {
                raw,
                prebilled,
                consumed_before,
                carried_in,
                included: included.map_or(Included::Infinite, Included::Quantity),
                unit,
                term: (0, 1),
                thresholds: &[],
            };
            let p = bill_event(i, &[(0, raw - prebilled)], &[], ("plan:gold", 100), &[]).unwrap();
            prop_assert_eq!(&p.computed, &compute(i).unwrap());
        }

        /// Random pools, usage and outcomes: no pool below zero, draws + billed units x unit + remainder = usage,
        /// and the balances replayed from the recorded draws are the pools' balances.
        #[test]
        fn pools_never_go_negative_and_everything_adds_up(
            defs in proptest::collection::vec((amount(), 0i64..4, proptest::option::of(0i64..48 * 3600)), 0..5),
            included in prop_oneof![Just(None), (0i64..5_000 * M).prop_map(Some)],
            events in proptest::collection::vec(
                (0i64..48, proptest::collection::vec((0i64..3600, 0i64..800 * M), 0..4), any::<bool>()),
                0..20,
            ),
            unit in prop_oneof![Just(1i64), 1i64..500],
        ) {
            let included = included.map_or(Included::Infinite, Included::Quantity);
            let mut pools: Vec<Available> = defs
                .iter()
                .enumerate()
                .map(|(k, (a, prio, exp))| Available {
                    id: format!("p{k}"),
                    priority: *prio * 50,
                    effective_at: 0,
                    expires_at: *exp,
                    period_start: 0,
                    total: *a,
                    left: *a,
                })
                .collect();
            let (mut consumed, mut carried, mut sent, mut drawn_total, mut usage_total) = (0i64, 0i64, 0i64, 0i64, 0i64);
            let mut journal: Vec<Draw> = Vec::new();
            let mut hours: Vec<_> = events.clone();
            hours.sort_by_key(|e| e.0);
            for (hour, records, billed) in hours {
                let usage: Vec<(i64, i64)> = records.iter().map(|(s, q)| (hour * 3600 + s, *q)).collect();
                let raw: i64 = usage.iter().map(|u| u.1).sum();
                let p = bill_event(
                    BillInputs { raw, prebilled: 0, consumed_before: consumed, carried_in: carried, included, unit, term: (0, 1), thresholds: &[] },
                    &usage,
                    &pools,
                    ("plan:gold", 100),
                    &[8000],
                ).unwrap();
                let c = &p.computed;
                let drawn: i64 = p.draws.iter().map(|d| d.quantity).sum();
                prop_assert_eq!(drawn + c.overage, raw);
                prop_assert_eq!(c.bill.included, drawn);
                // The journal: apply the draws to the pools and keep them.
                for d in &p.draws {
                    if let Some(pl) = pools.iter_mut().find(|x| x.id == d.id)
                        && let Amount::Quantity(l) = &mut pl.left
                    {
                        *l -= d.quantity;
                        prop_assert!(*l >= 0, "pool {} below zero", d.id);
                    }
                    if d.id != "plan:gold" {
                        // A record after a pool's expiry never draws from it.
                        let def = pools.iter().find(|x| x.id == d.id).unwrap();
                        let eligible: i64 = usage.iter().filter(|(t, _)| def.expires_at.is_none_or(|e| *t < e)).map(|u| u.1).sum();
                        prop_assert!(d.quantity <= eligible);
                    }
                }
                journal.extend(p.draws.iter().cloned());
                consumed = c.consumed_after;
                usage_total += raw;
                drawn_total += drawn;
                if billed {
                    carried = c.bill.remainder;
                    sent += c.bill.send;
                } else {
                    // Not billed (rejected): the draws stay drawn, the remainder taken is given back (outbound::settle).
                    usage_total -= c.overage;
                }
            }
            prop_assert_eq!(drawn_total + sent * unit + carried, usage_total);
            // Replaying the journal's draws from the declared amounts gives the same balances.
            for (k, (a, _, _)) in defs.iter().enumerate() {
                let id = format!("p{k}");
                let replayed = match a {
                    Amount::Infinite => Amount::Infinite,
                    Amount::Quantity(q) => Amount::Quantity(q - journal.iter().filter(|d| d.id == id).map(|d| d.quantity).sum::<i64>()),
                };
                prop_assert_eq!(replayed, pools.iter().find(|p| p.id == id).unwrap().left);
            }
        }
    }
}
