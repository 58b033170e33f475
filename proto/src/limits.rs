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

/// Largest tree or tree-index object an agent or node will reassemble and decode. Decoded, a
/// tree takes about three times its encoded size, so this bounds what one directory object
/// can cost a reader (~100 MB) whatever a snapshot says. Chunk lists are streamed and have
/// no such bound.
pub const MAX_TREE_BYTES: u64 = 32 * 1024 * 1024;

/// Size at which a backup splits a directory's tree over several part objects under a
/// tree index (about 100,000 entries a part). Below [`MAX_TREE_BYTES`] with room to spare.
pub const TREE_PART_BYTES: usize = 8 * 1024 * 1024;

/// Most chunks in one object reference (a snapshot root, a subtree, a chunk list): a tree
/// of `MAX_TREE_BYTES` cut into the smallest chunks any cluster may use needs fewer.
pub const MAX_OBJECT_REF_IDS: usize = 1 << 16;

/// Longest entry name (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest symlink target (Linux PATH_MAX).
pub const MAX_SYMLINK_BYTES: usize = 4096;

/// Most extended attributes per entry, and their total size.
pub const MAX_XATTRS: usize = 1024;
pub const MAX_XATTR_BYTES: usize = 1024 * 1024;

/// Longest client, dataset or tag label.
pub const MAX_LABEL_BYTES: usize = 128;

/// Catalog record bounds: a snapshot record is replicated to every catalog member and kept
/// forever, so none of its fields may grow without limit.
pub const MAX_HOSTNAME_BYTES: usize = 255;
pub const MAX_TAGS: usize = 64;
pub const MAX_SOURCE_PATHS: usize = 1024;
pub const MAX_SOURCE_PATH_BYTES: usize = 4096;
/// Most chunk ids in a snapshot's root reference.
pub const MAX_ROOT_IDS: usize = 4096;

/// Snapshots per `ListSnapshots` page: the default and the most a caller may ask for.
pub const DEFAULT_LIST_PAGE: u32 = 1000;
pub const MAX_LIST_PAGE: u32 = 1000;
