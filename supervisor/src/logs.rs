//! Log relay.
