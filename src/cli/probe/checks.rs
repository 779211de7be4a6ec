//! The probe's checks of one reservation and of both lanes: the `time` block, what a
//! reservation hides and lists, re-reading, the error lane, the three ways to clear and a
//! `limit` above 50.

use super::*;

impl Probe {
    /// The `time` block of a `get` answer.
    pub(super) async fn time_block(&mut self, time: &crate::bitrix::types::TimeInfo) {
        let processing = match time.processing {
            Some(p) if p.fract() == 0.0 => format!("processing {p} (whole seconds)"),
            Some(p) => format!("processing {p} (not a whole number)"),
            None => "no processing".to_string(),
        };
        let operating = match (time.operating, time.operating_reset_at) {
            (Some(used), Some(reset)) => {
                Some(format!("operating {used}, operating_reset_at {reset}"))
            }
            (Some(used), None) => Some(format!("operating {used} but no operating_reset_at")),
            (None, Some(reset)) => Some(format!("operating_reset_at {reset} but no operating")),
            (None, None) => None,
        };
        let finding = match operating {
            Some(text) if time.operating.is_some() && time.operating_reset_at.is_some() => {
                Finding::ok(
                    Check::TimeBlock,
                    format!("event.offline.get: {text}; {processing}"),
                )
            }
            Some(text) => Finding::fail(
                Check::TimeBlock,
                format!("event.offline.get: {text}; {processing}; the request economy needs both"),
            ),
            None => {
                let self_hosted = matches!(
                    self.plain.feature_get("rest_offline_extended").await,
                    Ok(FeatureValue::SelfHosted(_))
                );
                if self_hosted {
                    Finding::ok(
                        Check::TimeBlock,
                        format!(
                            "event.offline.get: no operating block (on-premise, limiter off); {processing}"
                        ),
                    )
                } else {
                    Finding::fail(
                        Check::TimeBlock,
                        format!(
                            "event.offline.get: no time.operating or time.operating_reset_at on a cloud portal; {processing}; the daemon cannot pace against the operating budget and only waits out 429s"
                        ),
                    )
                }
            }
        };
        self.found(finding);
    }

    /// A second plain `get` must not return the rows reserved under `p1`.
    pub(super) async fn reservation_hides(&mut self, p1: &str) -> Step<()> {
        let second = self
            .probe
            .offline_get(&GetRequest {
                limit: 10,
                clear: false,
                process_id: None,
                error_lane: false,
            })
            .await
            .map_err(|e| stop(&e))?;
        self.remember(second.process_id.as_ref());
        if second.events.is_empty() {
            self.found(Finding::ok(
                Check::ReservationHides,
                format!("a second get with clear=0 returned no rows while {p1} held them"),
            ));
            return Ok(());
        }
        let got: Vec<i64> = second.events.iter().map(|e| e.id).collect();
        self.found(Finding::fail(
            Check::ReservationHides,
            format!(
                "a second get with clear=0 returned rows {got:?} already reserved under {p1} (new process_id {})",
                second.process_id.as_deref().unwrap_or("none")
            ),
        ));
        Err(Stop::Failed("reserved rows were handed out twice".into()))
    }

    /// `event.offline.list` with `{">PROCESS_ID": ""}` finds the reservation.
    pub(super) async fn list_reserved(&mut self, p1: &str, listed: &[Row]) -> Step<()> {
        // One row left unreserved beside the reservation: a listing that ignored the filter
        // would return it too.
        self.create_rows(SMALL + 1..=SMALL + 1).await?;
        let unreserved = self
            .wait_rows(
                json!({"=EVENT_NAME": EVENT, "=PROCESS_ID": "", "=ERROR": 0}),
                1,
            )
            .await?;
        let finding = match self.probe.offline_list(json!({">PROCESS_ID": ""}), 0).await {
            Ok(page) => {
                let rows: Vec<Row> = page.items.iter().map(Row::of).collect();
                let right_ids = ids(&rows) == ids(listed);
                let right_pid = rows.iter().all(|r| r.process_id == p1);
                let observed = format!(
                    "returned rows {:?} with PROCESS_ID {:?}, total {}; reserved: {:?} under {p1}",
                    ids(&rows),
                    rows.iter()
                        .map(|r| r.process_id.as_str())
                        .collect::<BTreeSet<_>>(),
                    page.total,
                    ids(listed)
                );
                if right_ids && right_pid && page.total == listed.len() as u64 {
                    Finding::ok(Check::ListReservedFilter, observed)
                } else {
                    Finding::fail(Check::ListReservedFilter, observed)
                }
            }
            Err(e) if e.class == ErrorClass::Rejected => Finding::fail(
                Check::ListReservedFilter,
                format!("refused: {}", e.failure()),
            ),
            Err(e) => return Err(stop(&e)),
        };
        self.found(finding);
        // The unreserved row goes (a get with clear=1 deletes what it returns; it is the only
        // unreserved row of the probe's connector), so that the later checks find the normal
        // lane as before.
        if !unreserved.is_empty() {
            self.probe
                .offline_get(&GetRequest {
                    limit: 1,
                    clear: true,
                    process_id: None,
                    error_lane: false,
                })
                .await
                .map_err(|e| stop(&e))?;
        }
        Ok(())
    }

    /// `get` with `process_id` returns the reservation and leaves it reserved.
    pub(super) async fn reread(&mut self, p1: &str, listed: &[Row]) -> Step<()> {
        let again = self
            .probe
            .offline_get(&GetRequest {
                limit: 10,
                clear: false,
                process_id: Some(p1.to_string()),
                error_lane: false,
            })
            .await
            .map_err(|e| stop(&e))?;
        let got: Vec<i64> = again.events.iter().map(|e| e.id).collect();
        let now = self.all_rows().await?;
        let still: Vec<i64> = now
            .iter()
            .filter(|r| r.process_id == p1)
            .map(|r| r.id)
            .collect();
        let observed = format!(
            "get with process_id {p1} and clear=0 returned rows {got:?} (process_id {}); afterwards {still:?} are still reserved under it",
            again.process_id.as_deref().unwrap_or("none")
        );
        if got == ids(listed) && still == ids(listed) {
            self.found(Finding::ok(Check::RereadByProcessId, observed));
            Ok(())
        } else {
            self.found(Finding::fail(Check::RereadByProcessId, observed));
            Err(Stop::Failed("the reservation could not be re-read".into()))
        }
    }

    /// `event.offline.error` on row `a` of `p1`: the move, the merge of a later identical event,
    /// and the error lane's own `get`.
    pub(super) async fn error_lane(&mut self, p1: &str, a: &Row, made_at: Instant) -> Step<()> {
        self.probe
            .offline_error(p1, std::slice::from_ref(&a.message_id))
            .await
            .map_err(|e| stop(&e))?;
        let rows = self.all_rows().await?;
        let moved = rows.iter().find(|r| r.message_id == a.message_id);
        let mut problems = Vec::new();
        match moved {
            None => problems.push(format!("row {} is gone", a.id)),
            Some(r) => {
                if r.id != a.id {
                    problems.push(format!("its ID changed {} -> {}", a.id, r.id));
                }
                if !r.error {
                    problems.push("ERROR is still 0".to_string());
                }
                if !r.process_id.is_empty() {
                    problems.push(format!("PROCESS_ID is {:?}, not ''", r.process_id));
                }
                let stable = self
                    .findings
                    .iter()
                    .all(|f| f.check != Check::TimestampStable);
                if r.timestamp != a.timestamp && stable {
                    self.found(Finding::fail(
                        Check::TimestampStable,
                        format!(
                            "event.offline.error changed TIMESTAMP_X of ID {}: {} -> {}",
                            a.id, a.timestamp, r.timestamp
                        ),
                    ));
                } else if stable {
                    self.found(Finding::ok(
                        Check::TimestampStable,
                        format!(
                            "TIMESTAMP_X of ID {} stayed {} through the reservation and event.offline.error",
                            a.id, a.timestamp
                        ),
                    ));
                }
            }
        }
        let plain = self
            .probe
            .offline_get(&GetRequest {
                limit: 10,
                clear: false,
                process_id: None,
                error_lane: false,
            })
            .await
            .map_err(|e| stop(&e))?;
        self.remember(plain.process_id.as_ref());
        if plain.events.iter().any(|e| e.id == a.id) {
            problems.push("a plain get still returned it".to_string());
        }
        if !problems.is_empty() {
            self.found(Finding::fail(
                Check::ErrorLaneMove,
                format!(
                    "after event.offline.error on ID {}: {}",
                    a.id,
                    problems.join("; ")
                ),
            ));
            self.found(Finding::skipped(
                Check::ErrorLaneMerge,
                "not run: the row did not move to the error lane",
            ));
            return Ok(());
        }

        // A later identical event merges into the error-lane row.
        let wait = NEXT_SECOND.saturating_sub(made_at.elapsed());
        tokio::time::sleep(wait).await;
        self.go_on()?;
        self.create_rows(a.n().unwrap_or(1)..=a.n().unwrap_or(1))
            .await?;
        let started = Instant::now();
        let after = loop {
            let rows = self.all_rows().await?;
            // The row merged (a later TIMESTAMP_X) or a new row with the same parameters.
            let changed = rows.iter().any(|r| {
                (r.id == a.id && r.timestamp != a.timestamp) || (r.id != a.id && r.n() == a.n())
            });
            if changed || started.elapsed() >= ROWS_APPEAR_WITHIN {
                break rows;
            }
            self.go_on()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let same_n: Vec<&Row> = after.iter().filter(|r| r.n() == a.n()).collect();
        let merged = after.iter().find(|r| r.id == a.id);
        let finding = match merged {
            Some(r) if same_n.len() == 1 && r.timestamp != a.timestamp && r.error => Finding::ok(
                Check::ErrorLaneMerge,
                format!(
                    "an identical event.test {:.1} s later merged into ID {}: TIMESTAMP_X {} -> {}, ERROR still 1, no new row",
                    made_at.elapsed().as_secs_f64(),
                    a.id,
                    a.timestamp,
                    r.timestamp
                ),
            ),
            _ if same_n
                .iter()
                .any(|r| r.id != a.id && r.message_id != a.message_id) =>
            {
                Finding::skipped(
                    Check::ErrorLaneMerge,
                    format!(
                        "the second event.test produced another MESSAGE_ID (its EVENT_DATA differs: {}), so no merge could happen",
                        same_n
                            .iter()
                            .find(|r| r.id != a.id)
                            .map(|r| r.data.to_string())
                            .unwrap_or_default()
                    ),
                )
            }
            _ => Finding::fail(
                Check::ErrorLaneMerge,
                format!(
                    "after an identical event.test the rows with that MESSAGE_ID are {}",
                    same_n
                        .iter()
                        .map(|r| format!(
                            "ID {} (TIMESTAMP_X {}, ERROR {}, PROCESS_ID {:?})",
                            r.id,
                            r.timestamp,
                            u8::from(r.error),
                            r.process_id
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        self.found(finding);

        // Only the error lane's get sees it.
        let lane = self
            .probe
            .offline_get(&GetRequest {
                limit: 10,
                clear: false,
                process_id: None,
                error_lane: true,
            })
            .await
            .map_err(|e| stop(&e))?;
        self.remember(lane.process_id.as_ref());
        let got: Vec<i64> = lane.events.iter().map(|e| e.id).collect();
        if got.contains(&a.id) {
            self.found(Finding::ok(
                Check::ErrorLaneMove,
                format!(
                    "event.offline.error on ID {}: ERROR=1, PROCESS_ID '', same ID and TIMESTAMP_X; a plain get does not return it, get error=1 does (process_id {})",
                    a.id,
                    lane.process_id.as_deref().unwrap_or("none")
                ),
            ));
        } else {
            self.found(Finding::fail(
                Check::ErrorLaneMove,
                format!(
                    "event.offline.error on ID {} moved it (ERROR=1, PROCESS_ID ''), but get error=1 returned {got:?}",
                    a.id
                ),
            ));
        }
        Ok(())
    }

    /// The three ways of addressing `clear`, on rows `b` and `c` still reserved under `p1`.
    pub(super) async fn clears(&mut self, p1: &str, b: &Row, c: &Row) -> Step<()> {
        let reserved = |rows: &[Row]| -> Vec<i64> {
            rows.iter()
                .filter(|r| r.process_id == p1)
                .map(|r| r.id)
                .collect()
        };
        // A message_id of 31 characters.
        let short = b.message_id.chars().take(31).collect::<String>();
        let short = if short.chars().count() == 31 {
            short
        } else {
            "0".repeat(31)
        };
        let refused = self
            .probe
            .offline_clear(p1, &ClearTarget::MessageIds(vec![short]))
            .await;
        let left = reserved(&self.all_rows().await?);
        let finding = match refused {
            Err(e) if e.class == ErrorClass::Rejected => Finding::ok(
                Check::ClearMessageId32,
                format!("a 31-character message_id was refused: {}", e.failure()),
            ),
            Err(e) => return Err(stop(&e)),
            Ok(()) => Finding::fail(
                Check::ClearMessageId32,
                format!(
                    "a 31-character message_id was accepted; rows still reserved under {p1}: {left:?}"
                ),
            ),
        };
        self.found(finding);
        if left != [b.id, c.id] {
            self.found(Finding::skipped(
                Check::ClearByMessageId,
                format!(
                    "not run: rows {:?} were no longer both reserved ({left:?})",
                    [b.id, c.id]
                ),
            ));
            self.found(Finding::skipped(
                Check::ClearById,
                "not run: see clear_by_message_id",
            ));
            return Ok(());
        }
        self.probe
            .offline_clear(p1, &ClearTarget::MessageIds(vec![b.message_id.clone()]))
            .await
            .map_err(|e| stop(&e))?;
        let left = reserved(&self.all_rows().await?);
        let observed = format!(
            "clear of {p1} with message_id of ID {}: rows left reserved {left:?} (were {:?})",
            b.id,
            [b.id, c.id]
        );
        self.found(if left == [c.id] {
            Finding::ok(Check::ClearByMessageId, observed)
        } else {
            Finding::fail(Check::ClearByMessageId, observed)
        });
        if !left.contains(&c.id) {
            self.found(Finding::skipped(
                Check::ClearById,
                format!(
                    "not run: ID {} was deleted by the clear by message_id",
                    c.id
                ),
            ));
            return Ok(());
        }
        self.probe
            .offline_clear(p1, &ClearTarget::Ids(vec![c.id]))
            .await
            .map_err(|e| stop(&e))?;
        let after = reserved(&self.all_rows().await?);
        let expected: Vec<i64> = left.iter().copied().filter(|id| *id != c.id).collect();
        let observed = format!(
            "clear of {p1} with id {}: rows left reserved {after:?} (were {left:?})",
            c.id
        );
        self.found(if after == expected {
            Finding::ok(Check::ClearById, observed)
        } else {
            Finding::fail(Check::ClearById, observed)
        });
        Ok(())
    }

    /// 60 rows, one `get` with `limit` 60: how many come back.
    pub(super) async fn limit_above_50(&mut self) -> Step<()> {
        // The normal lane is empty of unreserved rows here; count only new ones.
        self.create_rows(101..=100 + LIMIT_ROWS).await?;
        let waiting = self
            .wait_rows(
                json!({"=EVENT_NAME": EVENT, "=PROCESS_ID": "", "=ERROR": 0}),
                LIMIT_ROWS as u64,
            )
            .await?;
        if (waiting.len() as u32) < LIMIT_ROWS {
            self.found(Finding::skipped(
                Check::GetLimitAbove50,
                format!(
                    "not run: only {} of {LIMIT_ROWS} rows showed within {} s",
                    waiting.len(),
                    ROWS_APPEAR_WITHIN.as_secs()
                ),
            ));
            return Ok(());
        }
        let got = self
            .probe
            .offline_get(&GetRequest {
                limit: LIMIT_ROWS,
                clear: false,
                process_id: None,
                error_lane: false,
            })
            .await
            .map_err(|e| stop(&e))?;
        self.remember(got.process_id.as_ref());
        let n = got.events.len() as u32;
        let observed = format!(
            "get with clear=0 and limit {LIMIT_ROWS} (the default is {LIST_LIMIT}) with {} rows waiting returned {n}",
            waiting.len()
        );
        self.found(if n >= LIMIT_ROWS {
            Finding::ok(Check::GetLimitAbove50, observed).with_value(i64::from(n))
        } else {
            Finding::fail(Check::GetLimitAbove50, observed).with_value(i64::from(n))
        });
        Ok(())
    }
}
