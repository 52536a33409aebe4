//! meshup-federation (being built).
