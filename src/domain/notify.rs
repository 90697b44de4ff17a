//! Notifications to clients: Standard Webhooks signatures, the retry schedule, and which
//! destinations may be called.

use base64::Engine;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;
use std::net::IpAddr;
use std::time::Duration;

/// `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")), the Standard Webhooks
/// signature. None if the secret is not `whsec_` + base64.
pub fn sign(secret: &str, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> Option<String> {
    let raw = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).ok()?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// The `webhook-signature` header: one signature per valid secret, space-separated.
pub fn signature_header(
    secrets: &[&str],
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .filter_map(|s| sign(s, msg_id, timestamp_secs, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Delay before the next attempt after `attempts_made` attempts, from `schedule` (whose first
/// entry is the delay before the first attempt), with ±10% jitter; None when exhausted.
pub fn next_delay(schedule: &[Duration], attempts_made: usize, jitter: f64) -> Option<Duration> {
    let base = *schedule.get(attempts_made)?;
    Some(base.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0)))
}

/// Which addresses notifications (and archive fetches) may go to.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    /// When not empty, only these networks may be called.
    pub allow: Vec<IpNet>,
    /// Never called.
    pub deny: Vec<IpNet>,
    /// Also refuse loopback and private addresses (`INTERNAL`), except for `exempt_hosts`.
    pub refuse_internal: bool,
    /// Hosts (as written in the URL) that may be internal all the same.
    pub exempt_hosts: Vec<String>,
    /// Refuse this host's own addresses (loopback) unless `allow` lists them: a notification a
    /// client aims at `127.1:5432` would otherwise make its delivery log a port scanner.
    pub refuse_loopback: bool,
}

/// This host and the private networks: what a URL from outside (upstream's result URLs, say)
/// must not make the relay fetch and hand back.
const INTERNAL: [&str; 9] = [
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "198.18.0.0/15",
    "192.0.0.0/24",
];

fn internal() -> &'static [IpNet] {
    static NETS: std::sync::OnceLock<Vec<IpNet>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| INTERNAL.iter().filter_map(|n| n.parse().ok()).collect())
}

/// The IPv4 address an IPv6 address carries, if it carries one: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`). Each reaches
/// that IPv4 host, so each is judged as it.
pub fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let tail = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        std::net::Ipv4Addr::new(a, b, c, d)
    };
    match s {
        // ::a.b.c.d, but not :: and ::1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(tail(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(tail(hi, lo)),
        [0x2002, hi, lo, ..] => Some(tail(hi, lo)),
        _ => None,
    }
}

/// Link-local (which holds most clouds' metadata services), other metadata endpoints, and
/// addresses that are not unicast destinations. Refused unless explicitly allowed.
const ALWAYS_REFUSED: [&str; 11] = [
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    // Azure's wire server and Oracle Cloud's metadata service.
    "168.63.129.16/32",
    "192.0.0.192/32",
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
];

/// ALWAYS_REFUSED, parsed once.
fn always_refused() -> &'static [IpNet] {
    static NETS: std::sync::OnceLock<Vec<IpNet>> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        ALWAYS_REFUSED
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    })
}

impl NetworkPolicy {
    /// Parses CIDR lists (a bare address means a single host).
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Self, String> {
        let parse = |list: &[String]| -> Result<Vec<IpNet>, String> {
            list.iter()
                .map(|s| {
                    s.parse::<IpNet>()
                        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| format!("`{s}` is not a network (CIDR) or address"))
                })
                .collect()
        };
        Ok(NetworkPolicy {
            allow: parse(allow)?,
            deny: parse(deny)?,
            refuse_internal: false,
            exempt_hosts: Vec::new(),
            refuse_loopback: false,
        })
    }

    /// Checks a URL whose host is an address literal (which is never resolved, so the resolver's
    /// check never sees it); a host name is checked later, on what it resolves to.
    pub fn check_url_host(&self, url: &url::Url) -> Result<(), String> {
        let host = url.host_str().unwrap_or("");
        match url.host() {
            Some(url::Host::Ipv4(a)) => self.check_host(host, IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => self.check_host(host, IpAddr::V6(a)),
            _ => Ok(()),
        }
    }

    /// Ok, or why `ip`, which `host` resolved to (or is), is refused.
    pub fn check_host(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        let judged = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.refuse_internal
            && internal().iter().any(|n| n.contains(&judged))
            && !self
                .exempt_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
        {
            return Err(format!(
                "{ip} is a loopback or private address (list the host in archive.allowed_hosts to allow it)"
            ));
        }
        self.check(ip)
    }

    /// Ok, or why the address is refused.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = match ip {
            // An IPv6 address that carries an IPv4 address is judged as that address.
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(format!("{ip} is in a denied network"));
        }
        let explicitly_allowed = self.allow.iter().any(|n| n.contains(&ip));
        if !self.allow.is_empty() && !explicitly_allowed {
            return Err(format!("{ip} is not in an allowed network"));
        }
        if self.refuse_loopback && ip.is_loopback() && !explicitly_allowed {
            return Err(format!(
                "{ip} is this host (loopback): list it in notifications.allow_networks to allow it"
            ));
        }
        let refused = always_refused().iter().any(|n| n.contains(&ip));
        if refused && !explicitly_allowed {
            return Err(format!(
                "{ip} is a link-local, metadata or non-unicast address"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_ipv4_is_judged_as_the_ipv4_it_reaches() {
        let p = NetworkPolicy::parse(&[], &[]).unwrap();
        for refused in [
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "168.63.129.16",
            "192.0.0.192",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(p.check(ip).is_err(), "{refused}");
        }
        assert!(p.check("2002:0808:0808::1".parse().unwrap()).is_ok());
        assert_eq!(embedded_ipv4("::1".parse().unwrap()), None);
    }

    #[test]
    fn internal_addresses_are_refused_unless_their_host_is_exempt() {
        let mut p = NetworkPolicy::parse(&[], &[]).unwrap();
        p.refuse_internal = true;
        for ip in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.0.9",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
        ] {
            assert!(
                p.check_host("img.example", ip.parse().unwrap()).is_err(),
                "{ip}"
            );
        }
        assert!(p
            .check_host("img.example", "8.8.8.8".parse().unwrap())
            .is_ok());
        p.exempt_hosts = vec!["127.0.0.1".into()];
        assert!(p
            .check_host("127.0.0.1", "127.0.0.1".parse().unwrap())
            .is_ok());
        assert!(p.check_host("127.1", "127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn standard_webhooks_test_vector() {
        // From the Standard Webhooks specification's reference implementations.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        let both = signature_header(
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_AAAA"],
            "m",
            1,
            b"x",
        );
        assert_eq!(both.split(' ').count(), 2);
        assert!(sign("whsec_!!!", "m", 1, b"x").is_none());
    }

    #[test]
    fn schedule_runs_out() {
        let s = [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_secs(300),
        ];
        assert_eq!(next_delay(&s, 0, 0.5), Some(Duration::ZERO));
        let d = next_delay(&s, 1, 0.0).unwrap();
        assert!(d >= Duration::from_millis(4500) && d <= Duration::from_secs(5));
        assert_eq!(next_delay(&s, 3, 0.5), None);
    }

    #[test]
    fn destinations() {
        let p = NetworkPolicy::default();
        for ok in ["127.0.0.1", "10.1.2.3", "192.168.1.1", "8.8.8.8", "::1"] {
            assert!(p.check(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "169.254.169.254",
            "fe80::1",
            "100.100.100.200",
            "0.0.0.0",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "168.63.129.16",
            "192.0.0.192",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(p.check(bad.parse().unwrap()).is_err(), "{bad}");
        }
        let p = NetworkPolicy::parse(&["10.0.0.0/8".into()], &["10.9.0.0/16".into()]).unwrap();
        assert!(p.check("10.1.1.1".parse().unwrap()).is_ok());
        assert!(p.check("10.9.1.1".parse().unwrap()).is_err());
        assert!(p.check("192.168.1.1".parse().unwrap()).is_err());
        let p = NetworkPolicy::parse(&["169.254.10.0/24".into()], &[]).unwrap();
        assert!(
            p.check("169.254.10.5".parse().unwrap()).is_ok(),
            "explicit allow wins"
        );
        assert!(NetworkPolicy::parse(&["nope".into()], &[]).is_err());
    }

    #[test]
    fn loopback_is_refused_in_every_spelling_unless_allowed() {
        let p = NetworkPolicy {
            refuse_loopback: true,
            ..NetworkPolicy::default()
        };
        for bad in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            let why = p.check(bad.parse().unwrap()).unwrap_err();
            assert!(why.contains("loopback"), "{bad}: {why}");
        }
        assert!(
            p.check("10.1.2.3".parse().unwrap()).is_ok(),
            "private stays allowed"
        );
        let p = NetworkPolicy {
            refuse_loopback: true,
            ..NetworkPolicy::parse(&["127.0.0.0/8".into()], &[]).unwrap()
        };
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
    }
}
