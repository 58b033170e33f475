//! Bounds that every request and every decoded object is checked against, in one place so the
//! agent never produces what a node would refuse.

/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// HTTP/2 settings both sides advertise: frames of up to 1 MiB (the default 16 KiB costs a
/// write system call per 16 KiB of chunk data) and flow-control windows large enough for
/// several batches in flight.
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
pub const CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// Most ids in one `Has` or `Get` request.
pub const MAX_IDS_PER_REQUEST: usize = 16 * 1024;

/// Most chunks in one `Put` request.
pub const MAX_CHUNKS_PER_PUT: usize = 1024;

/// Target size of one `Put` or `Get` message's chunk payload.
pub const TARGET_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Largest manifest object (a tree or a chunk list) an agent or node will reassemble.
pub const MAX_OBJECT_BYTES: u64 = 512 * 1024 * 1024;

/// Longest entry name (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest symlink target (Linux PATH_MAX).
pub const MAX_SYMLINK_BYTES: usize = 4096;

/// Most extended attributes per entry, and their total size.
pub const MAX_XATTRS: usize = 1024;
pub const MAX_XATTR_BYTES: usize = 1024 * 1024;

/// Longest client, dataset or tag label.
pub const MAX_LABEL_BYTES: usize = 128;
