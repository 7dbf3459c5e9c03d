//! The IDs compiled rules use for each other: an interface or upstream is named once, at
//! load, and referred to by index from then on. Each ID indexes one list of the
//! [`crate::snapshot::Snapshot`] it came from and means nothing in another snapshot.

/// Index of an interface in `Snapshot::interfaces` (config order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterfaceId(pub u32);

/// Index of an upstream in `Snapshot::upstreams` (sorted by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub u32);
