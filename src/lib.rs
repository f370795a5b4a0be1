//! gantry: a pull-through caching mirror for container registries.
//!
//! The request path, top to bottom: [`server`] accepts connections, [`api`] turns `/v2/` requests
//! into typed calls, [`mirror`] decides between the caches ([`store`], [`tags`]) and the
//! [`upstream`]; all of them speak the protocol types of [`oci`].
// Only store::mapped (it maps blob files: it says what it measured to earn it), server::rlimit
// (getrlimit/setrlimit) and store::lock (flock on the store's serve.lock) may use `unsafe`; each
// says why that is sound.
#![deny(unsafe_code)]

pub mod access;
pub mod api;
pub mod app;
pub mod bundle;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod configure;
pub mod control;
pub mod ctl;
#[doc(hidden)]
pub mod fuzzing;
pub mod human;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod redis;
pub mod server;
pub mod single_flight;
pub mod store;
pub mod tags;
pub mod tls;
pub mod upstream;
pub mod warm;
