//! Several instances sharing the portals of one PostgreSQL journal: which portals this instance
//! should own (`plan`), and the lease task that renews, gives up and takes the leases and starts
//! and stops each portal's work with them (`lease_task`).

pub mod lease_task;
pub mod plan;
