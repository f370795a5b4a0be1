//! gantry: a pull-through caching mirror for container registries.
//!
//! The request path, top to bottom: [`server`] accepts connections, [`api`] turns `/v2/` requests
//! into typed calls, [`mirror`] decides between the caches ([`store`], [`tags`]) and the
//! [`upstream`]; all of them speak the protocol types of [`oci`].
// Only store::mapped may use `unsafe` (it maps blob files); it says why that is sound and what it
// measured to earn it.
#![deny(unsafe_code)]

pub mod access;
pub mod api;
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod server;
pub mod store;
pub mod tags;
pub mod upstream;
pub mod warm;
