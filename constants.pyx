# cython: language_level=3, embedsignature=True
"""Names and numbers fixed by the wire contract (docs/contract.md).

Everything here is a plain constant: the split sizes, the manifest's block, the compiled-in resource key
string, the name rules and the role sets. The configuration (names and defaults) is main.py's Settings.
"""

# The binary split: the small part is min(SPLIT_SMALL_MAX, floor(0.3 * len(blob))) bytes.
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

# Names of resources and folders (contract section 2).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"

# The root folder of the Resource API holds cdn.yaml.
CDN_CONFIG_NAME = "cdn.yaml"

# Roles (contract section 3). Any other role text is kept as it is.
ROLE_OPERATOR = "Operator"
ROLE_VALIDATOR = "Validator"
ROLE_COMPANION_PC = "CompanionPC"
ROLE_ADMIN = "Admin"
ROLE_RESOURCE_UPLOADER = "ResourceUploader"
ROLE_API_ADMIN = "ApiAdmin"
KNOWN_ROLES = (ROLE_OPERATOR, ROLE_VALIDATOR, ROLE_COMPANION_PC, ROLE_ADMIN, ROLE_RESOURCE_UPLOADER,
               ROLE_API_ADMIN)
UPLOAD_ROLES = frozenset((ROLE_ADMIN, ROLE_RESOURCE_UPLOADER, ROLE_API_ADMIN))
