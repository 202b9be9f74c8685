"""libvirt's remote protocol as declared data: constants, the packet header, the error,
and the argument and reply types of every procedure pyvirtbackup serves.

The declarations follow libvirt 9.0's ``virnetprotocol.x``, ``virkeepaliveprotocol.x``
and ``remote_protocol.x`` (numbers, field order, limits); only the procedures of
``PROCEDURES`` are declared, and everything else is answered as unsupported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .xdr import (
    BOOL,
    DOUBLE,
    HYPER,
    INT,
    UHYPER,
    UINT,
    VOID,
    Array,
    FixedOpaque,
    Optional,
    String,
    Union,
    XdrType,
    struct_of,
)

# --- virnetprotocol.x: framing and limits ----------------------------------------------

MESSAGE_MAX = 33554432  # a packet, header and payload, without its length word
MESSAGE_HEADER_MAX = 24
MESSAGE_PAYLOAD_MAX = MESSAGE_MAX - MESSAGE_HEADER_MAX
MESSAGE_LEN_MAX = 4  # the length word, which counts itself
MESSAGE_STRING_MAX = 4194304
MESSAGE_NUM_FDS_MAX = 32

REMOTE_PROGRAM = 0x20008086
REMOTE_PROTOCOL_VERSION = 1
KEEPALIVE_PROGRAM = 0x6B656570
KEEPALIVE_PROTOCOL_VERSION = 1
KEEPALIVE_PROC_PING = 1
KEEPALIVE_PROC_PONG = 2


class MessageType(enum.IntEnum):
    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5
    STREAM_HOLE = 6


class MessageStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    CONTINUE = 2


HEADER = struct_of(
    "virNetMessageHeader",
    prog=UINT,
    vers=UINT,
    proc=INT,
    type=INT,
    serial=UINT,
    status=INT,
)

# --- remote_protocol.x: the types procedures share -------------------------------------

REMOTE_STRING_MAX = 4194304
REMOTE_DOMAIN_LIST_MAX = 16384
REMOTE_AUTH_TYPE_LIST_MAX = 20
REMOTE_DOMAIN_JOB_STATS_MAX = 64
REMOTE_DOMAIN_CHECKPOINT_LIST_MAX = 16384
REMOTE_DOMAIN_FSFREEZE_MOUNTPOINTS_MAX = 256
REMOTE_DOMAIN_MESSAGES_MAX = 2048
REMOTE_SECURITY_MODEL_MAX = 257
REMOTE_SECURITY_DOI_MAX = 257
VIR_UUID_BUFLEN = 16
REMOTE_AUTH_NONE = 0

NONNULL_STRING = String(REMOTE_STRING_MAX, "remote_nonnull_string")
STRING = Optional(NONNULL_STRING)
UUID = FixedOpaque(VIR_UUID_BUFLEN, "remote_uuid")
# rpcgen encodes each ``char`` (and ``unsigned char``, ``unsigned short``) in 4 bytes
CHAR = INT
UCHAR = UINT
USHORT = UINT

NONNULL_DOMAIN = struct_of("remote_nonnull_domain", name=NONNULL_STRING, uuid=UUID, id=INT)
DOMAIN = Optional(NONNULL_DOMAIN)
NONNULL_NETWORK = struct_of("remote_nonnull_network", name=NONNULL_STRING, uuid=UUID)
NONNULL_CHECKPOINT = struct_of(
    "remote_nonnull_domain_checkpoint", name=NONNULL_STRING, dom=NONNULL_DOMAIN
)

ERROR = struct_of(
    "remote_error",
    code=INT,
    domain=INT,
    message=STRING,
    level=INT,
    dom=DOMAIN,
    str1=STRING,
    str2=STRING,
    str3=STRING,
    int1=INT,
    int2=INT,
    net=Optional(NONNULL_NETWORK),
)
VIR_ERR_ERROR = 2  # virErrorLevel of every error we send


class TypedParamType(enum.IntEnum):
    INT = 1
    UINT = 2
    LLONG = 3
    ULLONG = 4
    DOUBLE = 5
    BOOLEAN = 6
    STRING = 7


TYPED_PARAM_VALUE = Union(
    "remote_typed_param_value",
    {
        TypedParamType.INT: INT,
        TypedParamType.UINT: UINT,
        TypedParamType.LLONG: HYPER,
        TypedParamType.ULLONG: UHYPER,
        TypedParamType.DOUBLE: DOUBLE,
        TypedParamType.BOOLEAN: BOOL,
        TypedParamType.STRING: NONNULL_STRING,
    },
)
TYPED_PARAM = struct_of("remote_typed_param", field=NONNULL_STRING, value=TYPED_PARAM_VALUE)
JOB_PARAMS = Array(TYPED_PARAM, REMOTE_DOMAIN_JOB_STATS_MAX)


def _dom_flags(name: str) -> XdrType:
    return struct_of(name, dom=NONNULL_DOMAIN, flags=UINT)


def _dom_only(name: str) -> XdrType:
    return struct_of(name, dom=NONNULL_DOMAIN)


def _one(name: str, field: str, xtype: XdrType) -> XdrType:
    return struct_of(name, **{field: xtype})


# --- procedures --------------------------------------------------------------------------


class Proc(enum.IntEnum):
    """REMOTE_PROC_* numbers of the procedures and events used here."""

    CONNECT_OPEN = 1
    CONNECT_CLOSE = 2
    CONNECT_GET_TYPE = 3
    CONNECT_GET_VERSION = 4
    CONNECT_GET_CAPABILITIES = 7
    DOMAIN_GET_XML_DESC = 14
    DOMAIN_GET_AUTOSTART = 15
    DOMAIN_GET_INFO = 16
    DOMAIN_GET_OS_TYPE = 19
    CONNECT_LIST_DEFINED_DOMAINS = 21
    DOMAIN_LOOKUP_BY_ID = 22
    DOMAIN_LOOKUP_BY_NAME = 23
    DOMAIN_LOOKUP_BY_UUID = 24
    CONNECT_NUM_OF_DEFINED_DOMAINS = 25
    CONNECT_LIST_DOMAINS = 37
    CONNECT_NUM_OF_DOMAINS = 51
    CONNECT_GET_HOSTNAME = 59
    CONNECT_SUPPORTS_FEATURE = 60
    AUTH_LIST = 66
    CONNECT_GET_URI = 110
    NODE_GET_SECURITY_MODEL = 122
    CONNECT_IS_SECURE = 149
    DOMAIN_IS_ACTIVE = 150
    DOMAIN_IS_PERSISTENT = 151
    CONNECT_GET_LIB_VERSION = 157
    DOMAIN_GET_JOB_INFO = 163
    DOMAIN_ABORT_JOB = 164
    DOMAIN_HAS_MANAGED_SAVE_IMAGE = 183
    DOMAIN_IS_UPDATED = 202
    DOMAIN_GET_STATE = 212
    DOMAIN_GET_BLOCK_JOB_INFO = 238
    CONNECT_LIST_ALL_DOMAINS = 273
    DOMAIN_GET_JOB_STATS = 298
    CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY = 316
    CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY = 317
    DOMAIN_EVENT_CALLBACK_BLOCK_JOB = 326
    DOMAIN_FSFREEZE = 335
    DOMAIN_FSTHAW = 336
    DOMAIN_EVENT_BLOCK_JOB_2 = 339
    CONNECT_REGISTER_CLOSE_CALLBACK = 360
    CONNECT_UNREGISTER_CLOSE_CALLBACK = 361
    DOMAIN_EVENT_CALLBACK_JOB_COMPLETED = 363
    DOMAIN_CHECKPOINT_CREATE_XML = 411
    DOMAIN_CHECKPOINT_GET_XML_DESC = 412
    DOMAIN_LIST_ALL_CHECKPOINTS = 413
    DOMAIN_CHECKPOINT_LIST_ALL_CHILDREN = 414
    DOMAIN_CHECKPOINT_LOOKUP_BY_NAME = 415
    DOMAIN_CHECKPOINT_GET_PARENT = 416
    DOMAIN_CHECKPOINT_DELETE = 417
    DOMAIN_BACKUP_BEGIN = 421
    DOMAIN_BACKUP_GET_XML_DESC = 422
    DOMAIN_GET_MESSAGES = 426
    DOMAIN_ABORT_JOB_FLAGS = 442
    DOMAIN_FD_ASSOCIATE = 443


@dataclass(frozen=True)
class Signature:
    args: XdrType
    ret: XdrType


_CHECKPOINT_FLAGS = struct_of("checkpoint_flags", checkpoint=NONNULL_CHECKPOINT, flags=UINT)
_CHECKPOINT_LIST = struct_of(
    "checkpoint_list",
    checkpoints=Array(NONNULL_CHECKPOINT, REMOTE_DOMAIN_CHECKPOINT_LIST_MAX),
    ret=INT,
)
_FSFREEZE = struct_of(
    "remote_domain_fsfreeze_args",
    dom=NONNULL_DOMAIN,
    mountpoints=Array(NONNULL_STRING, REMOTE_DOMAIN_FSFREEZE_MOUNTPOINTS_MAX),
    flags=UINT,
)
_FILESYSTEMS = _one("remote_domain_fsfreeze_ret", "filesystems", INT)
_DOMAIN_RET = _one("domain_ret", "dom", NONNULL_DOMAIN)

SIGNATURES: dict[int, Signature] = {
    Proc.CONNECT_OPEN: Signature(
        struct_of("remote_connect_open_args", name=STRING, flags=UINT), VOID
    ),
    Proc.CONNECT_CLOSE: Signature(VOID, VOID),
    Proc.CONNECT_GET_TYPE: Signature(VOID, _one("get_type_ret", "type", NONNULL_STRING)),
    Proc.CONNECT_GET_VERSION: Signature(VOID, _one("get_version_ret", "hv_ver", UHYPER)),
    Proc.CONNECT_GET_CAPABILITIES: Signature(
        VOID, _one("get_capabilities_ret", "capabilities", NONNULL_STRING)
    ),
    Proc.DOMAIN_GET_XML_DESC: Signature(
        _dom_flags("get_xml_desc_args"), _one("xml_ret", "xml", NONNULL_STRING)
    ),
    Proc.DOMAIN_GET_AUTOSTART: Signature(
        _dom_only("get_autostart_args"), _one("get_autostart_ret", "autostart", INT)
    ),
    Proc.DOMAIN_GET_INFO: Signature(
        _dom_only("get_info_args"),
        struct_of(
            "remote_domain_get_info_ret",
            state=UCHAR,
            maxMem=UHYPER,
            memory=UHYPER,
            nrVirtCpu=USHORT,
            cpuTime=UHYPER,
        ),
    ),
    Proc.DOMAIN_GET_OS_TYPE: Signature(
        _dom_only("get_os_type_args"), _one("get_os_type_ret", "type", NONNULL_STRING)
    ),
    Proc.CONNECT_LIST_DEFINED_DOMAINS: Signature(
        _one("list_defined_args", "maxnames", INT),
        _one("list_defined_ret", "names", Array(NONNULL_STRING, REMOTE_DOMAIN_LIST_MAX)),
    ),
    Proc.DOMAIN_LOOKUP_BY_ID: Signature(_one("lookup_by_id_args", "id", INT), _DOMAIN_RET),
    Proc.DOMAIN_LOOKUP_BY_NAME: Signature(
        _one("lookup_by_name_args", "name", NONNULL_STRING), _DOMAIN_RET
    ),
    Proc.DOMAIN_LOOKUP_BY_UUID: Signature(_one("lookup_by_uuid_args", "uuid", UUID), _DOMAIN_RET),
    Proc.CONNECT_NUM_OF_DEFINED_DOMAINS: Signature(VOID, _one("num_ret", "num", INT)),
    Proc.CONNECT_LIST_DOMAINS: Signature(
        _one("list_domains_args", "maxids", INT),
        _one("list_domains_ret", "ids", Array(INT, REMOTE_DOMAIN_LIST_MAX)),
    ),
    Proc.CONNECT_NUM_OF_DOMAINS: Signature(VOID, _one("num_ret", "num", INT)),
    Proc.CONNECT_GET_HOSTNAME: Signature(VOID, _one("hostname_ret", "hostname", NONNULL_STRING)),
    Proc.CONNECT_SUPPORTS_FEATURE: Signature(
        _one("supports_feature_args", "feature", INT),
        _one("supports_feature_ret", "supported", INT),
    ),
    Proc.AUTH_LIST: Signature(
        VOID, _one("remote_auth_list_ret", "types", Array(INT, REMOTE_AUTH_TYPE_LIST_MAX))
    ),
    Proc.CONNECT_GET_URI: Signature(VOID, _one("get_uri_ret", "uri", NONNULL_STRING)),
    Proc.NODE_GET_SECURITY_MODEL: Signature(
        VOID,
        struct_of(
            "remote_node_get_security_model_ret",
            model=Array(CHAR, REMOTE_SECURITY_MODEL_MAX),
            doi=Array(CHAR, REMOTE_SECURITY_DOI_MAX),
        ),
    ),
    Proc.CONNECT_IS_SECURE: Signature(VOID, _one("is_secure_ret", "secure", INT)),
    Proc.DOMAIN_IS_ACTIVE: Signature(
        _dom_only("is_active_args"), _one("active_ret", "active", INT)
    ),
    Proc.DOMAIN_IS_PERSISTENT: Signature(
        _dom_only("is_persistent_args"), _one("persistent_ret", "persistent", INT)
    ),
    Proc.CONNECT_GET_LIB_VERSION: Signature(VOID, _one("lib_version_ret", "lib_ver", UHYPER)),
    Proc.DOMAIN_GET_JOB_INFO: Signature(
        _dom_only("get_job_info_args"),
        struct_of(
            "remote_domain_get_job_info_ret",
            type=INT,
            timeElapsed=UHYPER,
            timeRemaining=UHYPER,
            dataTotal=UHYPER,
            dataProcessed=UHYPER,
            dataRemaining=UHYPER,
            memTotal=UHYPER,
            memProcessed=UHYPER,
            memRemaining=UHYPER,
            fileTotal=UHYPER,
            fileProcessed=UHYPER,
            fileRemaining=UHYPER,
        ),
    ),
    Proc.DOMAIN_ABORT_JOB: Signature(_dom_only("abort_job_args"), VOID),
    Proc.DOMAIN_HAS_MANAGED_SAVE_IMAGE: Signature(
        _dom_flags("has_managed_save_args"), _one("result_ret", "result", INT)
    ),
    Proc.DOMAIN_IS_UPDATED: Signature(
        _dom_only("is_updated_args"), _one("updated_ret", "updated", INT)
    ),
    Proc.DOMAIN_GET_STATE: Signature(
        _dom_flags("get_state_args"), struct_of("get_state_ret", state=INT, reason=INT)
    ),
    Proc.DOMAIN_GET_BLOCK_JOB_INFO: Signature(
        struct_of("block_job_info_args", dom=NONNULL_DOMAIN, path=NONNULL_STRING, flags=UINT),
        struct_of(
            "remote_domain_get_block_job_info_ret",
            found=INT,
            type=INT,
            bandwidth=UHYPER,
            cur=UHYPER,
            end=UHYPER,
        ),
    ),
    Proc.CONNECT_LIST_ALL_DOMAINS: Signature(
        struct_of("list_all_domains_args", need_results=INT, flags=UINT),
        struct_of(
            "list_all_domains_ret",
            domains=Array(NONNULL_DOMAIN, REMOTE_DOMAIN_LIST_MAX),
            ret=UINT,
        ),
    ),
    Proc.DOMAIN_GET_JOB_STATS: Signature(
        _dom_flags("get_job_stats_args"),
        struct_of("get_job_stats_ret", type=INT, params=JOB_PARAMS),
    ),
    Proc.CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: Signature(
        struct_of("callback_register_any_args", eventID=INT, dom=DOMAIN),
        _one("callback_register_any_ret", "callbackID", INT),
    ),
    Proc.CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY: Signature(
        _one("callback_deregister_any_args", "callbackID", INT), VOID
    ),
    Proc.DOMAIN_FSFREEZE: Signature(_FSFREEZE, _FILESYSTEMS),
    Proc.DOMAIN_FSTHAW: Signature(_FSFREEZE, _FILESYSTEMS),
    Proc.CONNECT_REGISTER_CLOSE_CALLBACK: Signature(VOID, VOID),
    Proc.CONNECT_UNREGISTER_CLOSE_CALLBACK: Signature(VOID, VOID),
    Proc.DOMAIN_CHECKPOINT_CREATE_XML: Signature(
        struct_of(
            "checkpoint_create_args", dom=NONNULL_DOMAIN, xml_desc=NONNULL_STRING, flags=UINT
        ),
        _one("checkpoint_create_ret", "checkpoint", NONNULL_CHECKPOINT),
    ),
    Proc.DOMAIN_CHECKPOINT_GET_XML_DESC: Signature(
        _CHECKPOINT_FLAGS, _one("xml_ret", "xml", NONNULL_STRING)
    ),
    Proc.DOMAIN_LIST_ALL_CHECKPOINTS: Signature(
        struct_of("list_all_checkpoints_args", dom=NONNULL_DOMAIN, need_results=INT, flags=UINT),
        _CHECKPOINT_LIST,
    ),
    Proc.DOMAIN_CHECKPOINT_LIST_ALL_CHILDREN: Signature(
        struct_of(
            "list_all_children_args", checkpoint=NONNULL_CHECKPOINT, need_results=INT, flags=UINT
        ),
        _CHECKPOINT_LIST,
    ),
    Proc.DOMAIN_CHECKPOINT_LOOKUP_BY_NAME: Signature(
        struct_of("checkpoint_lookup_args", dom=NONNULL_DOMAIN, name=NONNULL_STRING, flags=UINT),
        _one("checkpoint_lookup_ret", "checkpoint", NONNULL_CHECKPOINT),
    ),
    Proc.DOMAIN_CHECKPOINT_GET_PARENT: Signature(
        _CHECKPOINT_FLAGS, _one("checkpoint_parent_ret", "parent", NONNULL_CHECKPOINT)
    ),
    Proc.DOMAIN_CHECKPOINT_DELETE: Signature(_CHECKPOINT_FLAGS, VOID),
    Proc.DOMAIN_BACKUP_BEGIN: Signature(
        struct_of(
            "remote_domain_backup_begin_args",
            dom=NONNULL_DOMAIN,
            backup_xml=NONNULL_STRING,
            checkpoint_xml=STRING,
            flags=UINT,
        ),
        VOID,
    ),
    Proc.DOMAIN_BACKUP_GET_XML_DESC: Signature(
        _dom_flags("backup_get_xml_desc_args"), _one("xml_ret", "xml", NONNULL_STRING)
    ),
    Proc.DOMAIN_GET_MESSAGES: Signature(
        _dom_flags("get_messages_args"),
        _one("get_messages_ret", "msgs", Array(NONNULL_STRING, REMOTE_DOMAIN_MESSAGES_MAX)),
    ),
    Proc.DOMAIN_ABORT_JOB_FLAGS: Signature(_dom_flags("abort_job_flags_args"), VOID),
    Proc.DOMAIN_FD_ASSOCIATE: Signature(
        struct_of(
            "remote_domain_fd_associate_args", dom=NONNULL_DOMAIN, name=NONNULL_STRING, flags=UINT
        ),
        VOID,
    ),
}

# events the daemon sends (VIR_NET_MESSAGE), by procedure
EVENTS: dict[int, XdrType] = {
    Proc.DOMAIN_EVENT_CALLBACK_BLOCK_JOB: struct_of(
        "remote_domain_event_callback_block_job_msg",
        callbackID=INT,
        msg=struct_of(
            "remote_domain_event_block_job_msg",
            dom=NONNULL_DOMAIN,
            path=NONNULL_STRING,
            type=INT,
            status=INT,
        ),
    ),
    Proc.DOMAIN_EVENT_BLOCK_JOB_2: struct_of(
        "remote_domain_event_block_job_2_msg",
        callbackID=INT,
        dom=NONNULL_DOMAIN,
        dst=NONNULL_STRING,
        type=INT,
        status=INT,
    ),
    Proc.DOMAIN_EVENT_CALLBACK_JOB_COMPLETED: struct_of(
        "remote_domain_event_callback_job_completed_msg",
        callbackID=INT,
        dom=NONNULL_DOMAIN,
        params=JOB_PARAMS,
    ),
}

# virDrvFeature numbers clients ask CONNECT_SUPPORTS_FEATURE about
FEATURE_FD_PASSING = 8
FEATURE_TYPED_PARAM_STRING = 9
FEATURE_PROGRAM_KEEPALIVE = 10
FEATURE_REMOTE_EVENT_CALLBACK = 14
FEATURE_REMOTE_CLOSE_CALLBACK = 15
