//! Retry timing for outbound calls: exponential backoff with full jitter (the enrichment
//! lookup) and a fixed schedule with jitter (event webhooks, as Standard Webhooks / Svix
//! document theirs).

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::Duration;

/// Exponential backoff with **full jitter** (AWS Architecture Blog, "Exponential Backoff
/// and Jitter"): the delay before retry `attempt` (1 = the first retry) is uniform in
/// `[0, min(max, base · 2^(attempt-1))]`, which spreads many clients' retries out best.
/// Never returns less than 1 ms.
pub fn full_jitter(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = exponential(attempt, base, max);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::thread_rng().gen_range(1..=ms))
}

/// The un-jittered ceiling of [`full_jitter`]: `min(max, base · 2^(attempt-1))`.
pub fn exponential(attempt: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(30)).min(max)
}

/// How far a scheduled delay may move either way: ±20 %, so endpoints that failed together
/// are not retried together.
pub const SCHEDULE_JITTER: f64 = 0.2;

/// A fixed retry schedule: the delays before the 2nd, 3rd… attempt (the first attempt is
/// immediate). Written as durations with a unit, comma-separated: `5s,5m,30m,2h,5h,10h,10h`
/// (units `ms`, `s`, `m`, `h`, `d`), in TOML as a string or a list of such strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(pub Vec<Duration>);

impl RetrySchedule {
    /// Standard Webhooks' (Svix's) schedule: immediately, then after 5 s, 5 min, 30 min,
    /// 2 h, 5 h, 10 h and 10 h — 8 attempts over about 27.6 hours.
    pub fn standard() -> Self {
        let s = Duration::from_secs;
        RetrySchedule(vec![
            s(5),
            s(5 * 60),
            s(30 * 60),
            s(2 * 3600),
            s(5 * 3600),
            s(10 * 3600),
            s(10 * 3600),
        ])
    }

    /// Attempts in all (the first plus one per delay).
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX).saturating_add(1)
    }

    /// The delay after failed attempt number `attempts_made` (1-based), jittered by
    /// ±[`SCHEDULE_JITTER`]; `None` when the schedule is exhausted.
    pub fn delay_after(&self, attempts_made: u32) -> Option<Duration> {
        let base = *self.0.get(attempts_made.checked_sub(1)? as usize)?;
        let factor = 1.0 + rand::thread_rng().gen_range(-SCHEDULE_JITTER..=SCHEDULE_JITTER);
        Some(base.mul_f64(factor))
    }

    /// Parses `5s,5m,30m` (empty: no retries).
    pub fn parse(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(parse_duration)
            .collect::<Result<Vec<_>, _>>()
            .map(RetrySchedule)
    }
}

impl std::fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|d| format!("{}ms", d.as_millis())).collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses one duration with a unit: `250ms`, `5s`, `5m`, `2h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration such as 5s, 5m or 2h"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("'{s}' has no unit: write it as 5s, 5m, 2h, 1d or 250ms")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("'{s}' is too long"))
}

impl Serialize for RetrySchedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RetrySchedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            List(Vec<String>),
        }
        let text = match Form::deserialize(d)? {
            Form::Text(t) => t,
            Form::List(l) => l.join(","),
        };
        RetrySchedule::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_capped_exponential() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 1..12 {
            let ceiling = exponential(attempt, base, max);
            for _ in 0..50 {
                let d = full_jitter(attempt, base, max);
                assert!(
                    d >= Duration::from_millis(1) && d <= ceiling,
                    "{attempt}: {d:?} > {ceiling:?}"
                );
            }
        }
        assert_eq!(exponential(1, base, max), base);
        assert_eq!(exponential(3, base, max), base * 4);
        assert_eq!(exponential(30, base, max), max);
    }

    #[test]
    fn schedules_parse_and_jitter_within_twenty_percent() {
        let s = RetrySchedule::parse("5s, 5m,30m,2h,5h,10h,10h").unwrap();
        assert_eq!(s, RetrySchedule::standard());
        assert_eq!(s.attempts(), 8);
        for _ in 0..100 {
            let d = s.delay_after(1).unwrap();
            assert!(d >= Duration::from_secs(4) && d <= Duration::from_secs(6), "{d:?}");
        }
        assert!(s.delay_after(8).is_none());
        assert!(s.delay_after(0).is_none());
        assert_eq!(RetrySchedule::parse("").unwrap().attempts(), 1);
        assert!(RetrySchedule::parse("5").is_err());
        assert!(RetrySchedule::parse("5 weeks").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        let round: RetrySchedule = serde_json::from_value(serde_json::json!(["1s", "2s"])).unwrap();
        assert_eq!(round.0, vec![Duration::from_secs(1), Duration::from_secs(2)]);
        let again: RetrySchedule = serde_json::from_value(serde_json::to_value(&round).unwrap()).unwrap();
        assert_eq!(again, round);
    }
}
