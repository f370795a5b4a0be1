//! Where gantry may connect for a registry that a *client* named (`allow_any_registry`).
//!
//! A mirror that dials whatever host a request names is a door into the network it runs in: the
//! cloud metadata service at 169.254.169.254, internal registries that trust their network, any
//! internal https service. So for those registries every host name is resolved here, every
//! resolved address is classified, and the connector is handed only the addresses that passed:
//! there is no second lookup that DNS rebinding could answer differently. Addresses written as
//! literals (`127.0.0.1`, `[::1]`) skip DNS and are classified the same way. Redirects and token
//! realms of such a registry go through the same connector, so they are checked too.
//!
//! Registries the operator configured (`mirroring.source`, `registries:`) are trusted as written
//! and use an unchecked connector. `allow_any_registry_networks` lets an operator open an
//! internal range on purpose, the way Gitea's `ALLOW_LOCALNETWORKS` does for migrations.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Network;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// Why an address is not public, as a metric label and in the client's error message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    Unspecified,
    Loopback,
    /// RFC 1918, RFC 4193 (ULA) and the deprecated IPv6 site-local range.
    Private,
    /// 169.254.0.0/16 (where cloud metadata services live) and fe80::/10.
    LinkLocal,
    /// RFC 6598's shared address space, 100.64.0.0/10.
    SharedCgnat,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, protocol-assignment and future-use ranges.
    Reserved,
}

impl AddressClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::SharedCgnat => "cgnat",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
        }
    }
}

/// `None` for a globally routable address, else why it is not one. IPv4 addresses embedded in
/// IPv6 (mapped `::ffff:a.b.c.d`, compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged
/// by the IPv4 address they carry.
pub fn classify(address: IpAddr) -> Option<AddressClass> {
    match address {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(address: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, c, _] = address.octets();
    let class = match (a, b, c) {
        _ if address.is_broadcast() => AddressClass::Broadcast,
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) | (192, 168, _) => AddressClass::Private,
        (172, b, _) if (16..32).contains(&b) => AddressClass::Private,
        (169, 254, _) => AddressClass::LinkLocal,
        (100, b, _) if (64..128).contains(&b) => AddressClass::SharedCgnat,
        (224..=239, _, _) => AddressClass::Multicast,
        (240..=255, _, _) => AddressClass::Reserved,
        // Protocol assignments, TEST-NET-1/2/3, the 6to4 relay anycast, benchmarking.
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) | (192, 88, 99) => {
            AddressClass::Reserved
        }
        (198, 18 | 19, _) => AddressClass::Reserved,
        _ => return None,
    };
    Some(class)
}

fn classify_v6(address: Ipv6Addr) -> Option<AddressClass> {
    let bits = u128::from(address);
    let segments = address.segments();
    if address.is_unspecified() {
        return Some(AddressClass::Unspecified);
    }
    if address.is_loopback() {
        return Some(AddressClass::Loopback);
    }
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated).
    if bits >> 32 == 0xffff || bits >> 32 == 0 {
        return classify_v4(Ipv4Addr::from(bits as u32));
    }
    // NAT64's well-known prefix carries the IPv4 destination in its last 32 bits.
    if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        return classify_v4(Ipv4Addr::from(bits as u32));
    }
    // 6to4 carries it in bits 16..48.
    if segments[0] == 0x2002 {
        return classify_v4(Ipv4Addr::from((bits >> 80) as u32));
    }
    let class = match segments[0] {
        0xff00..=0xffff => AddressClass::Multicast,
        0xfe80..=0xfebf => AddressClass::LinkLocal,
        0xfec0..=0xfeff | 0xfc00..=0xfdff => AddressClass::Private,
        // Documentation (2001:db8::/32, 3fff::/20) and the IETF protocol assignments
        // (2001::/23: Teredo, ORCHID, ...), which a registry does not live in.
        0x2001 if segments[1] == 0x0db8 || segments[1] < 0x0200 => AddressClass::Reserved,
        0x3fff if segments[1] < 0x1000 => AddressClass::Reserved,
        // Only 2000::/3 is global unicast; the rest (local-use NAT64, discard, ...) is not.
        0x2000..=0x3fff => return None,
        _ => AddressClass::Reserved,
    };
    Some(class)
}

/// The addresses a checked registry may connect to.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    /// Non-public ranges the operator allowed (`allow_any_registry_networks`).
    pub allowed: Vec<Network>,
}

impl AddressPolicy {
    /// `Err` naming the address and its class when it may not be connected to.
    pub fn check(&self, host: &str, address: IpAddr) -> Result<(), AddressRefused> {
        let address = canonical(address);
        match classify(address) {
            None => Ok(()),
            Some(_) if self.allowed.iter().any(|n| n.contains(address)) => Ok(()),
            Some(class) => Err(AddressRefused {
                host: host.to_owned(),
                address,
                class,
            }),
        }
    }
}

/// IPv4-mapped IPv6 addresses are matched against IPv4 networks as the IPv4 address they are.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// A registry named by a client resolved to an address gantry will not connect to.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{host} resolves to {address}, a {} address, which a registry named by a client may not use (allow_any_registry_networks)", class.as_str().replace('_', "-"))]
pub struct AddressRefused {
    pub host: String,
    pub address: IpAddr,
    pub class: AddressClass,
}

/// Finds an [`AddressRefused`] among an error's sources (the connector's error is wrapped by
/// hyper-util's `ConnectError` and the client's own error).
pub fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a AddressRefused> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refused) = error.downcast_ref::<AddressRefused>() {
            return Some(refused);
        }
        current = error.source();
    }
    None
}

/// The TCP connector of every upstream: unchecked for configured registries, or resolving and
/// checking every address first under a policy.
#[derive(Clone)]
pub struct Connector {
    inner: HttpConnector<Resolver>,
    policy: Option<Arc<AddressPolicy>>,
}

impl Connector {
    pub fn new(policy: Option<AddressPolicy>) -> Self {
        let policy = policy.map(Arc::new);
        let inner = HttpConnector::new_with_resolver(Resolver {
            policy: policy.clone(),
        });
        Self { inner, policy }
    }

    pub fn inner_mut(&mut self) -> &mut HttpConnector<Resolver> {
        &mut self.inner
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // An address literal never reaches the resolver, so it is checked here.
        if let (Some(policy), Some(host)) = (&self.policy, uri.host()) {
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(address) = literal.parse::<IpAddr>() {
                if let Err(refused) = policy.check(host, address) {
                    return Box::pin(async move { Err(refused.into()) });
                }
            }
        }
        let connecting = self.inner.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// getaddrinfo on the blocking pool (as hyper-util's own resolver), then the policy: the
/// connector dials exactly the addresses returned here.
#[derive(Clone)]
pub struct Resolver {
    policy: Option<Arc<AddressPolicy>>,
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let Some(policy) = policy else {
                return Ok(resolved.into_iter());
            };
            let mut refused = None;
            let permitted: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match policy.check(&host, addr.ip()) {
                    Ok(()) => true,
                    Err(error) => {
                        refused.get_or_insert(error);
                        false
                    }
                })
                .collect();
            match (permitted.is_empty(), refused) {
                (false, _) => Ok(permitted.into_iter()),
                (true, Some(refused)) => Err(refused.into()),
                (true, None) => Err(format!("{host} resolves to no address").into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> Option<AddressClass> {
        classify(text.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges() {
        use AddressClass::*;
        for (address, expected) in [
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("0.0.0.0", Some(Unspecified)),
            ("10.1.2.3", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Private)),
            ("169.254.169.254", Some(LinkLocal)),
            ("100.64.0.1", Some(SharedCgnat)),
            ("100.127.255.255", Some(SharedCgnat)),
            ("100.128.0.1", None),
            ("224.0.0.1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.2.10", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("8.8.8.8", None),
            ("140.82.112.3", None),
        ] {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4() {
        use AddressClass::*;
        for (address, expected) in [
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fe80::1", Some(LinkLocal)),
            ("fd00::1", Some(Private)),
            ("fc12::1", Some(Private)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("2002:7f00:1::", Some(Loopback)),
            ("2606:4700::1111", None),
            ("2a00:1450:4001::200e", None),
        ] {
            assert_eq!(class(address), expected, "{address}");
        }
    }

    #[test]
    fn the_operator_can_allow_a_range() {
        let policy = AddressPolicy {
            allowed: vec![Network::parse("127.0.0.1/32").unwrap()],
        };
        assert!(policy.check("a", "127.0.0.1".parse().unwrap()).is_ok());
        // The mapped form of an allowed IPv4 address is the same address.
        assert!(policy
            .check("a", "::ffff:127.0.0.1".parse().unwrap())
            .is_ok());
        let refused = policy.check("b", "127.0.0.2".parse().unwrap()).unwrap_err();
        assert_eq!(refused.class, AddressClass::Loopback);
        assert!(refused.to_string().contains("127.0.0.2"), "{refused}");
        assert!(AddressPolicy::default()
            .check("c", "8.8.8.8".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn refusals_are_found_under_wrapping_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BoxError);
        let refused = AddressPolicy::default()
            .check("h", "10.0.0.1".parse().unwrap())
            .unwrap_err();
        let outer = Outer(Box::new(refused));
        assert_eq!(
            refusal(&outer).map(|r| r.class),
            Some(AddressClass::Private)
        );
        assert!(refusal(&Outer("plain".into())).is_none());
    }
}
