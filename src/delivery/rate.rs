//! Per-sender rate limiting by GCRA (the generic cell rate algorithm, a.k.a. virtual
//! scheduling): each sender has a theoretical arrival time (TAT); a message costing `c`
//! segments at `r` segments per second may go at `max(TAT, now)` and pushes the TAT on by
//! `c / r` seconds. Messages are spaced exactly, so no window of time ever carries more than
//! the rate plus the one message that opens it, whatever the concurrency — the state lives in
//! the database and is updated in the same transaction as the claim.
//!
//! Twilio counts throughput in segments per second per sender (twilio.md §8.1); a 3-segment
//! SMS on a 1-segment-per-second long code holds the sender for 3 s.

/// Reserves a send slot. `tat` is the sender's stored TAT (ms), `cost` the message's
/// segments, `rate` segments per second, `lookahead_ms` how far ahead of `now` a slot may be
/// and still be reserved now. Returns `(slot_at, new_tat)` in ms, or `None` when the sender's
/// next free slot is further ahead than the lookahead.
pub fn take_slot(tat: Option<i64>, now: i64, cost: u32, rate: f64, lookahead_ms: i64) -> Option<(i64, i64)> {
    let slot = tat.unwrap_or(now).max(now);
    if slot > now + lookahead_ms {
        return None;
    }
    let rate = if rate.is_finite() && rate > 0.0 { rate } else { 1.0 };
    let interval = ((f64::from(cost.max(1)) * 1000.0) / rate).ceil() as i64;
    Some((slot, slot + interval.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_sender_sends_at_once() {
        assert_eq!(take_slot(None, 1000, 1, 1.0, 0), Some((1000, 2000)));
        assert_eq!(take_slot(Some(10), 1000, 1, 1.0, 0), Some((1000, 2000)));
    }

    #[test]
    fn a_busy_sender_waits_its_turn() {
        assert_eq!(take_slot(Some(1500), 1000, 1, 1.0, 0), None);
        assert_eq!(take_slot(Some(1500), 1000, 3, 10.0, 600), Some((1500, 1800)));
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
                if let Some((slot, next)) = take_slot(tat, now, *cost, rate, 1000) {
                    proptest::prop_assert!(slot >= now);
                    sent.push((slot, *cost));
                    tat = Some(next);
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
