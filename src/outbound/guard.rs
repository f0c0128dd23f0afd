//! The address guard: which IP addresses the gateway may connect to when it calls a URL
//! someone else chose (webhook endpoints, the enrichment lookup), so that a URL cannot be
//! used to reach the gateway's own host, its private network or a cloud metadata service
//! (server-side request forgery).
//!
//! Refused (IANA special-purpose registries, RFC 6890 and its updates):
//! - IPv4: `0.0.0.0/8` (this network, unspecified), `10.0.0.0/8`, `172.16.0.0/12`,
//!   `192.168.0.0/16` (RFC 1918 private), `100.64.0.0/10` (carrier-grade NAT, RFC 6598),
//!   `127.0.0.0/8` (loopback), `169.254.0.0/16` (link-local, where cloud metadata services
//!   live), `192.0.0.0/24` (IETF protocol assignments), `192.0.2.0/24`, `198.51.100.0/24`,
//!   `203.0.113.0/24` (documentation), `198.18.0.0/15` (benchmarking), `224.0.0.0/4`
//!   (multicast), `240.0.0.0/4` (reserved) and the broadcast address.
//! - IPv6: `::` (unspecified), `::1` (loopback), `::ffff:0:0/96` (IPv4-mapped: refused
//!   whatever the IPv4 address, since the same socket reaches IPv4 hosts), `::/96`
//!   (IPv4-compatible, deprecated), `64:ff9b::/96` and `64:ff9b:1::/48` (NAT64, which
//!   reaches an IPv4 address), `2002::/16` (6to4, same), `fc00::/7` (unique local),
//!   `fe80::/10` (link-local), `fec0::/10` (site-local, deprecated), `ff00::/8` (multicast),
//!   `2001:db8::/32` (documentation), `100::/64` (discard).
//!
//! A host name is resolved and refused when **any** of its addresses is refused, and the
//! connection is made to exactly the addresses that were checked (the guard is the HTTP
//! client's resolver), so a name cannot resolve to a public address for the check and a
//! private one for the connection (DNS rebinding). Redirects are never followed, and proxies
//! from the environment are not used, so the checked address is the one connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Why a URL or address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// The URL is not an absolute `http`/`https` URL with a host.
    #[error("{0}")]
    BadUrl(String),
    /// The host is, or resolves to, an address the gateway must not call.
    #[error(
        "{host} resolves to {addr}, a {kind} address; such addresses are refused unless private networks are allowed"
    )]
    Forbidden {
        /// The host as written in the URL.
        host: String,
        /// The refused address.
        addr: IpAddr,
        /// What kind of address it is (`loopback`, `private`…).
        kind: &'static str,
    },
    /// The host name does not resolve.
    #[error("{host} does not resolve: {reason}")]
    Unresolvable {
        /// The host as written in the URL.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
}

/// What kind of special-purpose address `ip` is, or `None` for an ordinary public address.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RULES: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified"),
        ([10, 0, 0, 0], 8, "private"),
        ([100, 64, 0, 0], 10, "carrier-grade NAT"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([169, 254, 0, 0], 16, "link-local"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 0, 0, 0], 24, "IETF protocol assignment"),
        ([192, 0, 2, 0], 24, "documentation"),
        ([192, 168, 0, 0], 16, "private"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
    ];
    RULES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, kind)| *kind)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    let rules: [(Ipv6Addr, u32, &str); 11] = [
        (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96, "IPv4-mapped"),
        (Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96, "IPv4-compatible"),
        (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96, "NAT64"),
        (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, "NAT64"),
        (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, "6to4"),
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, "unique local"),
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
        (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, "site-local"),
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, "multicast"),
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32, "documentation"),
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, "discard"),
    ];
    rules
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
        .map(|(_, _, kind)| *kind)
}

/// The guard: whether special-purpose addresses are allowed at all
/// (`SWITCHBOARD_OUTBOUND__ALLOW_PRIVATE_NETWORKS`; the tests set it to reach their
/// loopback receivers).
#[derive(Debug, Clone, Copy)]
pub struct AddressGuard {
    /// Allow every address (no SSRF protection).
    pub allow_private: bool,
}

impl AddressGuard {
    /// Refuses `ip` unless it is public or private networks are allowed.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), GuardError> {
        if self.allow_private {
            return Ok(());
        }
        match classify(ip) {
            None => Ok(()),
            Some(kind) => Err(GuardError::Forbidden {
                host: host.to_string(),
                addr: ip,
                kind,
            }),
        }
    }

    /// Resolves `host` and checks every address; returns them (port 0).
    pub async fn resolve(&self, host: &str) -> Result<Vec<SocketAddr>, GuardError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check_ip(host, ip)?;
            return Ok(vec![SocketAddr::new(ip, 0)]);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, 0))
            .await
            .map_err(|e| GuardError::Unresolvable {
                host: host.to_string(),
                reason: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(GuardError::Unresolvable {
                host: host.to_string(),
                reason: "no addresses".into(),
            });
        }
        for a in &addrs {
            self.check_ip(host, a.ip())?;
        }
        Ok(addrs)
    }

    /// Parses `url` (absolute `http`/`https` with a host, no user info) and checks the
    /// addresses its host resolves to.
    pub async fn check_url(&self, url: &str) -> Result<url::Url, GuardError> {
        let parsed = parse_http_url(url)?;
        let host = parsed.host_str().unwrap_or_default().to_string();
        self.resolve(&host).await?;
        Ok(parsed)
    }
}

/// Parses an absolute `http`/`https` URL with a host and without credentials in it.
pub fn parse_http_url(url: &str) -> Result<url::Url, GuardError> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| GuardError::BadUrl(format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(GuardError::BadUrl(format!(
            "the scheme must be http or https, not {}",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(GuardError::BadUrl("the URL has no host".into()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(GuardError::BadUrl(
            "credentials in the URL are not allowed (the secret signs each request instead)".into(),
        ));
    }
    Ok(parsed)
}

/// The HTTP client's resolver: resolves with the system resolver and refuses names with a
/// refused address, so the connection goes only to checked addresses.
pub(super) struct GuardedResolver(pub AddressGuard);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = guard
                .resolve(&host)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl GuardedResolver {
    /// Shared form for `reqwest::ClientBuilder::dns_resolver`.
    pub(super) fn shared(guard: AddressGuard) -> Arc<Self> {
        Arc::new(Self(guard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        classify(s.parse().unwrap()).is_some()
    }

    #[test]
    fn special_purpose_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.10",
            "198.18.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert!(refused(a), "{a} should be refused");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "11.0.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
        ] {
            assert!(!refused(a), "{a} should pass");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_by_what_their_host_resolves_to() {
        let strict = AddressGuard { allow_private: false };
        for u in [
            "http://127.0.0.1:8080/x",
            "http://localhost/",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.5/",
            "http://2130706433/",
        ] {
            assert!(
                matches!(strict.check_url(u).await, Err(GuardError::Forbidden { .. })),
                "{u}"
            );
        }
        for u in [
            "ftp://example.com/",
            "not a url",
            "http://user:pw@example.com/",
            "file:///etc/passwd",
        ] {
            assert!(matches!(strict.check_url(u).await, Err(GuardError::BadUrl(_))), "{u}");
        }
        let open = AddressGuard { allow_private: true };
        assert!(open.check_url("http://127.0.0.1:9/").await.is_ok());
    }
}
