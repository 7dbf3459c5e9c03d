//! The IDs compiled rules use for each other: an interface or upstream is named once, at
//! load, and referred to by index from then on. Each ID indexes one list of the
//! snapshot it came from and means nothing in another snapshot.

/// Index of an interface in `Snapshot::interfaces` (config order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterfaceId(pub u32);

/// Index of an upstream in `Snapshot::upstreams` (sorted by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub u32);

/// Names interfaces by ID; the snapshot does. Limit keys hash an interface's name, not its
/// ID, so that they survive a reload that reorders interfaces.
pub trait InterfaceNames {
    /// The name of an interface.
    fn interface_name(&self, id: InterfaceId) -> &str;
}
