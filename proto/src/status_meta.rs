//! Metadata keys a node attaches to error statuses, so agents decide what to do by a key
//! they match on, never by the message text (which is for people and may change).

/// On `UNAVAILABLE` that is worth retrying (the node is starting, or the cluster has too
/// few members for the request right now): why, as a short word (`starting`,
/// `unavailable`). A transport failure (nothing listening) carries no such key.
pub const RETRY: &str = "x-hashgrid-retry";

/// The value of [`RETRY`] while a node is starting (its catalog is not ready yet).
pub const RETRY_STARTING: &str = "starting";

/// The value of [`RETRY`] when the cluster cannot serve the request right now.
pub const RETRY_UNAVAILABLE: &str = "unavailable";

/// On `FAILED_PRECONDITION` caused by a stale map epoch: the current epoch. Agents refresh
/// their map and retry when they see it (and do not give up as on a missing chunk).
pub const REFRESH: &str = "x-hashgrid-refresh";
