//! meshup-gateway (being built).
