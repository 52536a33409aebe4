//! meshup-gateway (being built).

pub mod certs;
pub mod identity;
pub mod inbound;
pub mod outbound;
pub mod tunnel;
