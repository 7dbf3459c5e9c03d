//! Grab backend.
