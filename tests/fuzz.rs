//! A randomized run of every fuzz target on stable Rust, bounded in time (`GANTRY_FUZZ_SECS` per
//! target, 2 s by default). The coverage-guided runs live in `fuzz/` (`scripts/fuzz`); this one
//! keeps CI honest about the same invariants. Seeds are realistic inputs; each round mutates one.

use std::time::{Duration, Instant};

const SEEDS: &[&[u8]] = &[
    b"library/alpine",
    b"ghcr.io/owner/app",
    b"3.20",
    b"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    b"/v2/library/alpine/manifests/latest",
    b"/v2/a/b/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    b"/v2/../x/tags/list",
    b"/v2/_catalog",
    b"/v2/a/blobs/uploads/some-uuid",
    b"/v2/a/referrers/sha512:00/",
    b"Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:a:pull\"",
    b"Basic realm=\"x\"",
    b"bearer realm=\"https://a.example/t\\\"x\", Scope=\"repository:a:pull,push\",service=reg",
    b"\x05bytes=0-99",
    b"\x01bytes=-10",
    b"listen: 0.0.0.0:5000\nmirroring:\n  tags_cache_ttl: 10m\nstorage:\n  max_size: 1GiB\n",
    b"registries:\n  - host: ghcr.io\n    url: https://ghcr.io\n",
    b"limits:\n  max_downloads: 1\n  max_connections: 1\ntimeouts:\n  idle: 1s\n  send: 1s\n",
    b"storage:\n  path: /var/lib/gantry\n  max_size: 1\n",
    // Just past the limits the loader refuses, so a dropped check shows up as an accepted config.
    b"limits:\n  max_downloads: 0\n",
    b"timeouts:\n  idle: 0s\n",
    b"storage:\n  max_size: 0\n",
];

/// xorshift64*: deterministic, so a failure prints a reproducible input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    const INTERESTING: &[u8] = b"/:.-_%\"=,\\\n\r\t \0\x7f\xff*0";
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = rng.next() as u8;
            }
            1 => {
                let at = rng.below(input.len() + 1);
                input.insert(at, INTERESTING[rng.below(INTERESTING.len())]);
            }
            2 if !input.is_empty() => {
                let at = rng.below(input.len());
                input.remove(at);
            }
            3 if !input.is_empty() => {
                let (from, len) = (rng.below(input.len()), rng.below(64));
                let chunk: Vec<u8> = input[from..(from + len).min(input.len())].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, chunk);
            }
            4 => input.truncate(rng.below(input.len() + 1)),
            5 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            _ => {
                let seed = SEEDS[rng.below(SEEDS.len())];
                input.extend_from_slice(&seed[..rng.below(seed.len() + 1)]);
            }
        }
    }
    input.truncate(4096);
}

/// A distinct, stable starting point per target (FNV-1a of its name): seeding with the name's
/// length gave `names`, `route` and `range` one shared sequence.
fn seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn run(name: &str, target: fn(&[u8])) {
    let budget = std::env::var("GANTRY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(2));
    let mut rng = Rng(seed(name));
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < budget {
        let mut input = SEEDS[rng.below(SEEDS.len())].to_vec();
        mutate(&mut rng, &mut input);
        let outcome = std::panic::catch_unwind(|| target(&input));
        assert!(outcome.is_ok(), "{name} panicked on {input:?}");
        runs += 1;
    }
    assert!(runs > 100, "{name}: only {runs} runs in {budget:?}");
    eprintln!(
        "{name}: {runs} inputs in {:?}, no failure",
        started.elapsed()
    );
}

#[test]
fn fuzz_names() {
    run("names", gantry::fuzzing::names);
}

#[test]
fn fuzz_route() {
    run("route", gantry::fuzzing::route);
}

#[test]
fn fuzz_www_authenticate() {
    run("www_authenticate", gantry::fuzzing::www_authenticate);
}

#[test]
fn fuzz_range() {
    run("range", gantry::fuzzing::range);
}

#[test]
fn fuzz_config() {
    run("config", gantry::fuzzing::config);
}
