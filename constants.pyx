# cython: language_level=3, embedsignature=True
"""Names and numbers fixed by the wire contract (docs/contract.md), and the retry policy of each upstream.

Everything here is a plain constant: the split sizes, the manifest's block, the compiled-in resource key
string, the name rules, the role sets and the retries. The configuration (names and defaults) is main.py's
Settings.
"""

# The binary split: the small part is min(SPLIT_SMALL_MAX, floor(0.3 * len(blob))) bytes (the rule is
# manifest.small_size's, and only there).
SPLIT_SMALL_MAX = 3072
SPLIT_SMALL_NUMERATOR = 3
SPLIT_SMALL_DENOMINATOR = 10
SMALL_SUFFIX = ".small"
BIG_SUFFIX = ".big"

# The sealed split (format 2): the manifest the Resource API holds beside the small part, and the block
# its digests cover. A load reads, verifies, decrypts and sends a block at a time (format 1 parts too, with
# the digests the cache took when it downloaded them): each block costs thread hand-offs, an event-loop
# wake-up and a few system calls, and 4 MiB ran cold loads about 10 % faster than 1 MiB (8 and 16 MiB
# gained nothing more), for about 16 MiB of buffers per load.
MANIFEST_SUFFIX = ".manifest"
MANIFEST_FORMAT = 2
MANIFEST_BLOCK_SIZE = 4 * 1024 * 1024
# A foreign uploader may choose another block size; beyond this a load would hold too much per block.
MAX_MANIFEST_BLOCK_SIZE = 64 * 1024 * 1024

# Key strings and suffixes of contract section 1. The resource key string is compiled in on purpose:
# it is never read from configuration.
RESOURCE_KEY_STRING = "azaion-loader/resource-key/v1"
HARDWARE_HASH_PREFIX = "Azaion_"
HARDWARE_HASH_SUFFIX = "_%$$$)0_"
API_KEY_SUFFIX = "-#%@AzaionKey@%#---"

IV_SIZE = 16
KEY_SIZE = 32

# Streaming granularity: large enough to amortise per-call overhead, small enough to keep memory flat.
CHUNK_SIZE = 1024 * 1024
# Blocks a load's verified reader (aligned_io.read_blocks) reads and hashes ahead of the one it sends (a
# buffer each, and one for the load): binary_split.LOAD_BUFFERS counts them in a load's share of the budget.
READ_AHEAD = 2

# Names of resources and folders (contract section 2).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"

# The root folder of the Resource API holds cdn.yaml.
CDN_CONFIG_NAME = "cdn.yaml"

# Roles that may upload (contract section 3). The others (Operator, Validator, CompanionPC, and any role
# text the contract does not name) are kept as they are and may load only.
UPLOAD_ROLES = frozenset(("Admin", "ResourceUploader", "ApiAdmin"))

# --- Retries: one policy per upstream, all its numbers here (README, "Retries") ---------------------------
# The Resource API (api_client: urllib3's Retry on the requests session). A call is tried API_ATTEMPTS times
# in all when it cannot connect, times out before the answer, or is answered with one of API_RETRY_STATUSES.
# urllib3 sends the first retry at once and waits API_BACKOFF * 2 ** (n - 1) s before the n-th (0.5 s before
# the third); a Retry-After is honoured instead, up to API_RETRY_AFTER_MAX s. Every call is retried, POSTs
# too: each is idempotent (a sign-in, a read, a store of the same file under the same name).
API_ATTEMPTS = 3
API_BACKOFF = 0.25
API_RETRY_STATUSES = (502, 503, 504)
API_RETRY_AFTER_MAX = 10
# The CDN (cdn_manager: botocore's "standard" mode). Each S3 request is tried CDN_ATTEMPTS times in all on a
# connection error, a timeout, a 5xx or throttling, after botocore's jittered exponential backoff. A body
# cut off mid-stream, which botocore does not retry, is resumed from its first missing byte (a ranged GET
# pinned to the ETag) at most CDN_RESUMES times per segment, after a random wait of up to
# CDN_RESUME_BACKOFF * 2 ** (n - 1) s before the n-th resume. Nothing else retries a CDN request.
CDN_ATTEMPTS = 5  # botocore's total_max_attempts: its max_attempts would count the retries alone
CDN_RESUMES = 3
CDN_RESUME_BACKOFF = 0.25

# --- The unlock ----------------------------------------------------------------------------------------
# The states of GET /unlock/status (docs/contract.md, "Unlock status"), in the order an unlock goes through
# them; unlock_state.UnlockStatus holds the current one, unlock.Unlocker moves it on.
IDLE = "idle"
AUTHENTICATING = "authenticating"
DOWNLOADING_KEY = "downloading_key"
DECRYPTING = "decrypting"
LOADING_IMAGES = "loading_images"
READY = "ready"
ERROR = "error"
UNLOCK_STATES = (IDLE, AUTHENTICATING, DOWNLOADING_KEY, DECRYPTING, LOADING_IMAGES, READY, ERROR)

# How long the Docker Engine may take to answer a question (its API version, an image's inspect): an
# Engine that accepts the connection and never answers fails the unlock after this, not after the hour a
# load may take.
ENGINE_TIMEOUT = 10
# How long loading the decrypted archive into the Engine may go without an answer.
ENGINE_LOAD_TIMEOUT = 3600

# --- Liveness: what a misbehaving peer may cost (docs/contract.md section 11) ----------------------------
# Every answer read from the Resource API has a cap; past it the answer is refused with 502 "...is not
# valid...". The small part is at most 3072 bytes and comes wrapped as a blob (IV and padding: 3104 bytes);
# a manifest lists 67 bytes per 4 MiB block, so 8 MiB hold the manifest of a 480 GiB resource, and its
# signed envelope (section 9, the manifest in Base64) that of a 360 GiB one.
MAX_LOGIN_ANSWER = 64 * 1024
MAX_SMALL_ANSWER = 64 * 1024
MAX_MANIFEST_ANSWER = 8 * 1024 * 1024
MAX_CDN_YAML_ANSWER = 64 * 1024
MAX_KEY_FRAGMENT_ANSWER = 64 * 1024
MAX_UPLOAD_ANSWER = 64 * 1024
# JSON from a peer (a login answer, a JWT's claims, a manifest) nests at most this deep.
MAX_JSON_DEPTH = 32
# The largest resource (plaintext or big part) any upstream may announce: sizes beyond it, negative ones and
# non-integers are refused before any arithmetic (1 TiB: far beyond any model, far below 2**63).
MAX_RESOURCE_BYTES = 1 << 40
# A JWT's exp is seconds since the epoch: finite and below this (the year 36812).
MAX_JWT_EXP = 1 << 40
# A cache sidecar larger than this is damaged (a manifest of MAX_RESOURCE_BYTES has under 5 MB of digests).
MAX_SIDECAR_BYTES = 16 * 1024 * 1024
