//! What one event's result means for meterd, as a value.
//!
//! (Over 600 lines only with its unit tests: about 300 of code, one role, classifying answers into settlements.)
//!
//! A batch call returns HTTP 200 even when every event failed, so "the call succeeded" says nothing about any event.
//! Each result is matched to the event it belongs to by its echoed key (never by position: the order is
//! undocumented) and classified into a [`Classified`] the emitter maps onto its outcomes, like vector's
//! `RetryAction` for partial failures. Events with no matching result were not answered for and must be retried.

use chrono::{DateTime, Utc};

use super::types::{UsageEvent, UsageResult, UsageStatus, parse_utc};
use crate::quantity::Micros;
use crate::resource::ResourceRef;
use crate::settle::{REFUSED, Settle, SettleContext, Settlement};

/// The meaning of one event's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Recorded; keep the id.
    Accepted {
        /// The marketplace's id for the event.
        usage_event_id: Option<String>,
    },
    /// The hour was already recorded with our quantity (a resend after a crash or an ambiguous failure), or the
    /// service did not say which quantity (logged). Keeps what the service said of the original.
    Duplicate {
        /// The quantity the service holds, when it said it.
        theirs_micros: Option<i64>,
        /// The service's id of the original event, when it said it.
        usage_event_id: Option<String>,
    },
    /// The hour was already recorded with another quantity; ours can never replace it. Alert.
    DuplicateMismatch {
        /// What we sent.
        ours_micros: i64,
        /// What was recorded first.
        theirs_micros: i64,
    },
    /// Outside the 24-hour window (or in the future); terminal for this hour.
    Expired,
    /// Unknown or not active resource: re-check the subscription.
    NotFoundOrNotActive {
        /// `ResourceNotFound` or `ResourceNotActive`.
        status: UsageStatus,
    },
    /// This identity may not report for the resource: a configuration error.
    NotAuthorized {
        /// The service's explanation.
        message: String,
    },
    /// A payload meterd should never produce: terminal, alert.
    Invalid {
        /// `InvalidDimension`, `InvalidQuantity` or `BadArgument`.
        status: UsageStatus,
        /// The service's explanation.
        message: String,
    },
    /// Retry later: `Error`, or a status this version does not know (a retry that was in fact recorded comes back
    /// as `Duplicate`, so retrying an unknown status cannot bill twice).
    Transient {
        /// What the service said.
        message: String,
        /// The event may have been recorded: an unknown status might mean it was, so an expiry after it must
        /// not carry the units (that could bill them twice); it ends `expired_unconfirmed` instead.
        ambiguous: bool,
    },
}

/// Classifies one result; `ours_micros` is the quantity we sent.
pub fn classify(result: &UsageResult, ours_micros: i64) -> Classified {
    let message = || {
        result
            .error
            .as_ref()
            .map(|e| e.summary())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| result.status.to_string())
    };
    match &result.status {
        UsageStatus::Accepted => Classified::Accepted {
            usage_event_id: result.usage_event_id.clone(),
        },
        UsageStatus::Duplicate => {
            let original = result
                .error
                .as_ref()
                .and_then(|e| e.additional_info.as_ref())
                .and_then(|a| a.accepted_message.as_ref());
            let theirs = original
                .and_then(|m| m.quantity)
                .and_then(Micros::from_f64_rounded)
                .map(|m| m.0);
            let usage_event_id = original
                .and_then(|m| m.usage_event_id.clone())
                .or_else(|| result.usage_event_id.clone());
            match theirs {
                Some(theirs) if theirs == ours_micros => Classified::Duplicate {
                    theirs_micros: Some(theirs),
                    usage_event_id,
                },
                Some(theirs) => Classified::DuplicateMismatch {
                    ours_micros,
                    theirs_micros: theirs,
                },
                None => {
                    tracing::warn!(
                        message = "Duplicate without the original quantity; treated as the same quantity.",
                        dimension = result.dimension.as_deref().unwrap_or(""),
                        effective_start_time = result.effective_start_time.as_deref().unwrap_or(""),
                    );
                    Classified::Duplicate {
                        theirs_micros: None,
                        usage_event_id,
                    }
                }
            }
        }
        UsageStatus::Expired => Classified::Expired,
        status @ (UsageStatus::ResourceNotFound | UsageStatus::ResourceNotActive) => {
            Classified::NotFoundOrNotActive {
                status: status.clone(),
            }
        }
        UsageStatus::ResourceNotAuthorized => Classified::NotAuthorized { message: message() },
        status @ (UsageStatus::InvalidDimension
        | UsageStatus::InvalidQuantity
        | UsageStatus::BadArgument) => Classified::Invalid {
            status: status.clone(),
            message: message(),
        },
        UsageStatus::Error => Classified::Transient {
            message: message(),
            ambiguous: false,
        },
        UsageStatus::Unknown(status) => Classified::Transient {
            message: format!("unknown status {status:?}: {}", message()),
            ambiguous: true,
        },
    }
}

/// The key a result is matched on: (resource, dimension, plan, hour).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SentKey {
    /// The resource as sent.
    pub resource: ResourceRef,
    /// Dimension id.
    pub dimension: String,
    /// Plan id.
    pub plan_id: String,
    /// `effectiveStartTime`.
    pub hour: DateTime<Utc>,
}

/// A frozen event that does not parse back into a key (it was not made by `event_json`).
#[derive(Debug, thiserror::Error)]
#[error("frozen event is not a valid usage event: {0}")]
pub struct SentKeyError(String);

impl SentKey {
    /// A key from its parts.
    pub fn new(
        resource: ResourceRef,
        plan_id: impl Into<String>,
        dimension: impl Into<String>,
        hour: DateTime<Utc>,
    ) -> Self {
        Self {
            resource,
            dimension: dimension.into(),
            plan_id: plan_id.into(),
            hour,
        }
    }

    /// The key of a frozen event (the JSON from `event_json`).
    pub fn from_event_json(json: &str) -> Result<Self, SentKeyError> {
        let event: UsageEvent =
            serde_json::from_str(json).map_err(|e| SentKeyError(e.to_string()))?;
        let resource = event
            .resource()
            .ok_or_else(|| SentKeyError("neither resourceId nor resourceUri".into()))?;
        let hour = parse_utc(&event.effective_start_time)
            .ok_or_else(|| SentKeyError("invalid effectiveStartTime".into()))?;
        Ok(Self::new(resource, event.plan_id, event.dimension, hour))
    }

    /// Whether `result` echoes this key. Resource ids and URIs compare case-insensitively (GUIDs and ARM ids are
    /// case-insensitive); times compare as instants, so `09:00:00Z`, `09:00:00.0000000Z` and `09:00:00+00:00` match.
    pub fn matches(&self, result: &UsageResult) -> bool {
        let echoed_resource = match &self.resource {
            ResourceRef::SaasId(_) => result.resource_id.as_deref(),
            ResourceRef::ResourceUri(_) => result.resource_uri.as_deref(),
        };
        echoed_resource.is_some_and(|r| r.eq_ignore_ascii_case(self.resource.as_str()))
            && result.dimension.as_deref() == Some(self.dimension.as_str())
            && result.plan_id.as_deref() == Some(self.plan_id.as_str())
            && result
                .effective_start_time
                .as_deref()
                .and_then(parse_utc)
                .is_some_and(|t| t == self.hour)
    }
}

/// Pairs each result with the sent event it echoes: `(index in sent, result)`, in `sent` order. Each event and each
/// result is used at most once. Results matching nothing are logged; use [`unmatched`] for events left without a
/// result (the emitter retries them).
pub fn match_results<'r>(
    sent: &[SentKey],
    response: &'r super::types::BatchUsageResponse,
) -> Vec<(usize, &'r UsageResult)> {
    let mut taken = vec![false; sent.len()];
    let mut pairs = Vec::with_capacity(sent.len());
    for result in &response.result {
        let found = sent
            .iter()
            .enumerate()
            .find(|(i, key)| !taken[*i] && key.matches(result));
        match found {
            Some((i, _)) => {
                taken[i] = true;
                pairs.push((i, result));
            }
            None => tracing::warn!(
                message = "Batch result matches no sent event; ignored.",
                status = %result.status,
                dimension = result.dimension.as_deref().unwrap_or(""),
                effective_start_time = result.effective_start_time.as_deref().unwrap_or(""),
            ),
        }
    }
    pairs.sort_by_key(|(i, _)| *i);
    pairs
}

/// Indices of `sent` events that have no result in `matched` (the output of [`match_results`]).
pub fn unmatched(sent: &[SentKey], matched: &[(usize, &UsageResult)]) -> Vec<usize> {
    let mut answered = vec![false; sent.len()];
    for (i, _) in matched {
        if let Some(slot) = answered.get_mut(*i) {
            *slot = true;
        }
    }
    answered
        .iter()
        .enumerate()
        .filter(|(_, a)| !**a)
        .map(|(i, _)| i)
        .collect()
}

/// Maps one event's classified answer onto its settlement at `now`. Pure.
pub fn settle(answer: Classified, event: &SettleContext, now: DateTime<Utc>) -> Settlement {
    let mut recheck_subscriptions = false;
    let settle = match answer {
        Classified::Accepted { usage_event_id } => Settle::Accepted { usage_event_id },
        Classified::Duplicate {
            theirs_micros,
            usage_event_id,
        } => Settle::Duplicate {
            market_quantity: theirs_micros.or(Some(event.sent_quantity)),
            usage_event_id,
        },
        Classified::DuplicateMismatch { theirs_micros, .. } => Settle::DuplicateMismatch {
            market_quantity: theirs_micros,
        },
        Classified::Expired => Settle::Expired {
            message: "the marketplace answered Expired".into(),
        },
        Classified::NotFoundOrNotActive { status } => {
            recheck_subscriptions = true;
            Settle::Hold {
                reason: format!(
                    "{REFUSED}{}; holding and re-checking the subscription at the next list refresh",
                    status.as_str()
                ),
                next_at: now + event.hold_recheck,
            }
        }
        Classified::NotAuthorized { message } => Settle::Rejected {
            reason: format!("ResourceNotAuthorized: {message}"),
        },
        Classified::Invalid { status, message } => Settle::Rejected {
            reason: format!("{}: {message}", status.as_str()),
        },
        Classified::Transient { message, ambiguous } => Settle::Retry {
            error: message,
            next_at: now + event.delays.after(event.attempts + 1),
            ambiguous,
        },
    };
    Settlement {
        settle,
        recheck_subscriptions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marketplace::types::{BatchUsageResponse, event_json};
    use chrono::TimeZone;

    const SUB: &str = "11111111-2222-3333-4444-555555555555";

    fn fixture() -> BatchUsageResponse {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/batch_response_mixed.json"
        );
        let text = std::fs::read_to_string(path).expect("fixture");
        serde_json::from_str(&text).expect("parses")
    }

    fn hour(d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, d, h, 0, 0)
            .single()
            .expect("valid")
    }

    fn result(json: &str) -> UsageResult {
        serde_json::from_str(json).expect("result")
    }

    fn with_status(status: &str) -> UsageResult {
        result(&format!(
            r#"{{"status":"{status}","error":{{"code":"BadArgument","message":"One or more errors have occurred.","details":[{{"target":"x","message":"why {status}"}}]}}}}"#
        ))
    }

    #[test]
    fn every_row_of_the_fixture() {
        let resp = fixture();
        let r = &resp.result;
        assert_eq!(
            classify(&r[0], 12_500_000),
            Classified::Accepted {
                usage_event_id: Some("0b9f6a52-0000-4000-8000-000000000001".into())
            }
        );
        // Ours was 3, the recorded original 2.
        assert_eq!(
            classify(&r[1], 3_000_000),
            Classified::DuplicateMismatch {
                ours_micros: 3_000_000,
                theirs_micros: 2_000_000
            }
        );
        assert!(matches!(
            classify(&r[1], 2_000_000),
            Classified::Duplicate {
                theirs_micros: Some(2_000_000),
                ..
            }
        ));
        assert_eq!(
            classify(&r[2], 1_000_000),
            Classified::NotFoundOrNotActive {
                status: UsageStatus::ResourceNotFound
            }
        );
        assert_eq!(classify(&r[3], 7_000_000), Classified::Expired);
        match classify(&r[4], 1_000_000) {
            Classified::Invalid { status, message } => {
                assert_eq!(status, UsageStatus::InvalidDimension);
                assert!(message.contains("dimension: The payload dimension is invalid."));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hand_made_statuses() {
        assert_eq!(
            classify(&with_status("ResourceNotActive"), 1),
            Classified::NotFoundOrNotActive {
                status: UsageStatus::ResourceNotActive
            }
        );
        assert!(matches!(
            classify(&with_status("ResourceNotAuthorized"), 1),
            Classified::NotAuthorized { message } if message.contains("why ResourceNotAuthorized")
        ));
        for (name, status) in [
            ("InvalidQuantity", UsageStatus::InvalidQuantity),
            ("BadArgument", UsageStatus::BadArgument),
            ("InvalidDimension", UsageStatus::InvalidDimension),
        ] {
            assert!(matches!(
                classify(&with_status(name), 1),
                Classified::Invalid { status: s, .. } if s == status
            ));
        }
        assert!(matches!(
            classify(&with_status("Error"), 1),
            Classified::Transient {
                ambiguous: false,
                ..
            }
        ));
        assert!(matches!(
            classify(&with_status("SomethingNew"), 1),
            Classified::Transient { message, ambiguous: true } if message.contains("SomethingNew")
        ));
        assert!(matches!(
            classify(&result(r#"{}"#), 1),
            Classified::Transient { .. }
        ));
        assert_eq!(
            classify(&result(r#"{"status":"Accepted"}"#), 1),
            Classified::Accepted {
                usage_event_id: None
            }
        );
    }

    #[test]
    fn duplicates_compare_rounded_micro_units() {
        let dup = |q: &str| {
            result(&format!(
                r#"{{"status":"Duplicate","error":{{"code":"Conflict","additionalInfo":{{"acceptedMessage":{{"quantity":{q}}}}}}}}}"#
            ))
        };
        let same = |q: i64| Classified::Duplicate {
            theirs_micros: Some(q),
            usage_event_id: None,
        };
        assert_eq!(classify(&dup("12.5"), 12_500_000), same(12_500_000));
        assert_eq!(classify(&dup("\"12.5\""), 12_500_000), same(12_500_000));
        assert_eq!(
            classify(&dup("0.30000000000000004"), 300_000),
            same(300_000)
        );
        assert_eq!(
            classify(&dup("12.4"), 12_500_000),
            Classified::DuplicateMismatch {
                ours_micros: 12_500_000,
                theirs_micros: 12_400_000
            }
        );
        // No acceptedMessage: treated as a duplicate (and logged).
        assert_eq!(
            classify(
                &result(r#"{"status":"Duplicate","error":{"code":"Conflict"}}"#),
                5
            ),
            Classified::Duplicate {
                theirs_micros: None,
                usage_event_id: None
            }
        );
    }

    /// Defect 8: a `Duplicate` keeps the marketplace's quantity and the original's `usageEventId`.
    #[test]
    fn a_duplicate_keeps_the_marketplace_quantity_and_usage_event_id() {
        let r = result(
            r#"{"status":"Duplicate","error":{"code":"Conflict","additionalInfo":{"acceptedMessage":
                {"usageEventId":"0b9f6a52-0000-4000-8000-00000000000a","quantity":4}}}}"#,
        );
        assert_eq!(
            classify(&r, 4_000_000),
            Classified::Duplicate {
                theirs_micros: Some(4_000_000),
                usage_event_id: Some("0b9f6a52-0000-4000-8000-00000000000a".into())
            }
        );
    }

    /// Defect 8: a per-event status this version does not know might mean recorded.
    #[test]
    fn an_unknown_per_event_status_is_ambiguous() {
        for r in [with_status("Queued"), result(r#"{}"#)] {
            assert!(matches!(
                classify(&r, 1),
                Classified::Transient {
                    ambiguous: true,
                    ..
                }
            ));
        }
    }

    fn sent_keys() -> Vec<SentKey> {
        let sub = ResourceRef::parse(SUB);
        [
            event_json(&sub, "gold", "gb_processed", hour(1, 9), 12_500_000),
            event_json(&sub, "gold", "api_calls_1k", hour(1, 9), 3_000_000),
            event_json(
                &ResourceRef::parse("99999999-2222-3333-4444-555555555555"),
                "gold",
                "gb_processed",
                hour(1, 9),
                1_000_000,
            ),
            event_json(
                &sub,
                "gold",
                "gb_processed",
                Utc.with_ymd_and_hms(2024, 4, 29, 6, 0, 0)
                    .single()
                    .expect("valid"),
                7_000_000,
            ),
            event_json(&sub, "gold", "no_such_dimension", hour(1, 9), 1_000_000),
            // Not answered for.
            event_json(&sub, "gold", "gb_processed", hour(1, 8), 1_000_000),
        ]
        .iter()
        .map(|j| SentKey::from_event_json(j).expect("key"))
        .collect()
    }

    #[test]
    fn matches_by_fields_not_position() {
        let sent = sent_keys();
        let mut resp = fixture();
        resp.result.reverse();
        let matched = match_results(&sent, &resp);
        let statuses: Vec<(usize, UsageStatus)> = matched
            .iter()
            .map(|(i, r)| (*i, r.status.clone()))
            .collect();
        assert_eq!(
            statuses,
            vec![
                (0, UsageStatus::Accepted),
                (1, UsageStatus::Duplicate),
                (2, UsageStatus::ResourceNotFound),
                (3, UsageStatus::Expired),
                (4, UsageStatus::InvalidDimension),
            ]
        );
        assert_eq!(unmatched(&sent, &matched), vec![5]);
    }

    #[test]
    fn echoed_time_forms_and_resource_case_are_normalised() {
        let sent = vec![
            SentKey::new(ResourceRef::parse(SUB), "gold", "d", hour(1, 9)),
            SentKey::new(
                ResourceRef::parse(
                    "/subscriptions/abc/resourceGroups/rg/providers/Microsoft.Solutions/applications/app",
                ),
                "std",
                "nodes",
                hour(1, 9),
            ),
        ];
        for time in [
            "2024-05-01T09:00:00Z",
            "2024-05-01T09:00:00.0000000Z",
            "2024-05-01T09:00:00+00:00",
        ] {
            let resp: BatchUsageResponse = serde_json::from_str(&format!(
                r#"{{"count":2,"result":[
                  {{"status":"Accepted","resourceUri":"/SUBSCRIPTIONS/abc/resourceGroups/rg/providers/Microsoft.Solutions/applications/app","dimension":"nodes","planId":"std","effectiveStartTime":"{time}"}},
                  {{"status":"Accepted","resourceId":"{}","dimension":"d","planId":"gold","effectiveStartTime":"{time}"}}
                ]}}"#,
                SUB.to_uppercase()
            ))
            .expect("response");
            let matched = match_results(&sent, &resp);
            assert_eq!(matched.len(), 2, "{time}");
            assert!(unmatched(&sent, &matched).is_empty());
        }
        // Another hour, plan or dimension does not match.
        let resp: BatchUsageResponse = serde_json::from_str(&format!(
            r#"{{"count":3,"result":[
              {{"status":"Accepted","resourceId":"{SUB}","dimension":"d","planId":"gold","effectiveStartTime":"2024-05-01T10:00:00Z"}},
              {{"status":"Accepted","resourceId":"{SUB}","dimension":"d","planId":"silver","effectiveStartTime":"2024-05-01T09:00:00Z"}},
              {{"status":"Accepted","resourceId":"{SUB}","dimension":"e","planId":"gold","effectiveStartTime":"2024-05-01T09:00:00Z"}}
            ]}}"#
        ))
        .expect("response");
        assert!(match_results(&sent, &resp).is_empty());
    }

    #[test]
    fn sent_key_rejects_foreign_json() {
        assert!(SentKey::from_event_json("{}").is_err());
        assert!(SentKey::from_event_json("not json").is_err());
    }

    fn settle_ctx() -> SettleContext {
        SettleContext {
            sent_quantity: 5_000_000,
            attempts: 0,
            delays: crate::retry::RetryDelays {
                min: std::time::Duration::from_secs(30),
                max: std::time::Duration::from_secs(60),
            },
            hold_recheck: chrono::Duration::seconds(300),
        }
    }

    #[test]
    fn settles_answers_onto_settlements() {
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        use chrono::Duration;
        let s = settle(
            Classified::Duplicate {
                theirs_micros: None,
                usage_event_id: None,
            },
            &settle_ctx(),
            now,
        );
        assert_eq!(
            s.settle,
            Settle::Duplicate {
                market_quantity: Some(5_000_000),
                usage_event_id: None
            }
        );
        let s = settle(
            Classified::NotFoundOrNotActive {
                status: UsageStatus::ResourceNotFound,
            },
            &settle_ctx(),
            now,
        );
        assert!(s.recheck_subscriptions);
        assert_eq!(
            s.settle,
            Settle::Hold {
                reason: "the marketplace answered ResourceNotFound; holding and re-checking the subscription at the next list refresh".into(),
                next_at: now + Duration::seconds(300)
            }
        );
        let s = settle(
            Classified::Transient {
                message: "Error".into(),
                ambiguous: true,
            },
            &settle_ctx(),
            now,
        );
        assert!(
            matches!(s.settle, Settle::Retry { ambiguous: true, next_at, .. } if next_at > now && next_at <= now + Duration::seconds(60))
        );
    }
}
