//! Several instances sharing the portals of one PostgreSQL journal: which portals this instance
//! should own (`plan`), and the leases that make each portal's owner the only one working it.

pub mod plan;
