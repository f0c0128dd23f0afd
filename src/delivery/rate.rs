//! Per-sender rate limiting by GCRA (the generic cell rate algorithm, a.k.a. virtual
//! scheduling): each sender has a theoretical arrival time (TAT); a message costing `c`
//! segments at `r` segments per second may go at `max(TAT, now)` and pushes the TAT on by
//! `c / r` seconds. Messages are spaced exactly, so no window of time ever carries more than
//! the rate plus the one message that opens it, whatever the concurrency — the state lives in
//! the database and is updated in the same transaction as the claim.
//!
//! Twilio counts throughput in segments per second per sender (twilio.md §8.1); a 3-segment
//! SMS on a 1-segment-per-second long code holds the sender for 3 s.

/// A reserved send slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// When the message may go (ms, rounded up so it never goes early).
    pub at_ms: i64,
    /// The sender's new TAT (µs).
    pub tat_us: i64,
    /// How long the message holds the sender (µs): `cost / rate`, at least 1 µs.
    pub hold_us: i64,
}

/// Reserves a send slot. `tat_us` is the sender's stored TAT in **microseconds** (so a
/// sender faster than 1,000 messages a second, or one whose interval is not a whole number of
/// milliseconds, keeps its exact rate), `now_ms` the clock, `cost` the message's segments,
/// `rate` segments per second, `lookahead_ms` how far ahead of now a slot may be and still be
/// reserved now. Returns `None` when the sender's next free slot is further ahead than the
/// lookahead.
pub fn take_slot(tat_us: Option<i64>, now_ms: i64, cost: u32, rate: f64, lookahead_ms: i64) -> Option<Slot> {
    let now_us = now_ms.saturating_mul(1000);
    let slot = tat_us.unwrap_or(now_us).max(now_us);
    if slot > now_us.saturating_add(lookahead_ms.saturating_mul(1000)) {
        return None;
    }
    let hold_us = hold_us(cost, rate);
    Some(Slot {
        at_ms: (slot + 999).div_euclid(1000),
        tat_us: slot + hold_us,
        hold_us,
    })
}

/// How long a message of `cost` segments holds a sender of `rate` segments per second, in µs
/// (at least 1). A rate that is not a positive number counts as 1 per second.
pub fn hold_us(cost: u32, rate: f64) -> i64 {
    let rate = if rate.is_finite() && rate > 0.0 { rate } else { 1.0 };
    (((f64::from(cost.max(1)) * 1_000_000.0) / rate).ceil() as i64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(at_ms: i64, tat_us: i64, hold_us: i64) -> Option<Slot> {
        Some(Slot { at_ms, tat_us, hold_us })
    }

    #[test]
    fn an_idle_sender_sends_at_once() {
        assert_eq!(take_slot(None, 1000, 1, 1.0, 0), slot(1000, 2_000_000, 1_000_000));
        assert_eq!(take_slot(Some(10), 1000, 1, 1.0, 0), slot(1000, 2_000_000, 1_000_000));
    }

    #[test]
    fn a_busy_sender_waits_its_turn() {
        assert_eq!(take_slot(Some(1_500_000), 1000, 1, 1.0, 0), None);
        assert_eq!(
            take_slot(Some(1_500_000), 1000, 3, 10.0, 600),
            slot(1500, 1_800_000, 300_000)
        );
    }

    #[test]
    fn fast_and_uneven_rates_keep_their_exact_spacing() {
        // 3,000 per second: 334 µs each (a third of a millisecond, rounded up), so 3,000 slots
        // take one second and 0.2 %; a whole-millisecond clock would have taken three.
        let mut tat = None;
        let mut last = None;
        for _ in 0..3000 {
            let s = take_slot(tat, 0, 1, 3000.0, 10_000).unwrap();
            tat = Some(s.tat_us);
            last = Some(s);
        }
        assert!(last.unwrap().at_ms <= 1002, "{last:?}");
        // 300 per second: 3,334 µs each, not the 4 ms a whole-millisecond clock would take.
        assert_eq!(hold_us(1, 300.0), 3334);
        assert_eq!(
            take_slot(Some(1_003_334), 1000, 1, 300.0, 10),
            slot(1004, 1_006_668, 3334)
        );
        // A million per second still moves the TAT on.
        assert_eq!(hold_us(1, 1_000_000.0), 1);
        assert_eq!(hold_us(2, f64::NAN), 2_000_000);
    }

    proptest::proptest! {
        /// However claims interleave, slots are spaced by cost / rate: the segments sent in
        /// any window never exceed rate × window + one message.
        #[test]
        fn slots_never_exceed_the_rate(costs in proptest::collection::vec(1u32..5, 1..60), rate in 1u32..50, steps in proptest::collection::vec(0i64..300, 1..60)) {
            let rate = f64::from(rate);
            let mut tat = None;
            let mut now = 0;
            let mut sent: Vec<(i64, u32)> = Vec::new();
            for (i, cost) in costs.iter().enumerate() {
                now += steps[i % steps.len()];
                if let Some(s) = take_slot(tat, now, *cost, rate, 1000) {
                    proptest::prop_assert!(s.at_ms >= now);
                    sent.push((s.at_ms, *cost));
                    tat = Some(s.tat_us);
                }
            }
            for (i, (start, _)) in sent.iter().enumerate() {
                let in_window: u32 = sent[i..].iter().take_while(|(t, _)| *t < start + 1000).map(|(_, c)| c).sum();
                let max_cost = sent[i..].iter().map(|(_, c)| *c).max().unwrap_or(0);
                proptest::prop_assert!(f64::from(in_window) <= rate + f64::from(max_cost));
            }
        }
    }
}
