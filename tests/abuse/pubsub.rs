//! Abuse cases: pubsub.

#[allow(unused_imports)]
use super::common;
