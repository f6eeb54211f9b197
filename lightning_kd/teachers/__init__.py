"""Teachers: local models and files (:mod:`.local`), an HTTP API (:mod:`.remote`, wire formats in :mod:`.codecs`),
the protocol the budgeted fill uses (:mod:`.base`)."""

from lightning_kd.teachers.base import RetryPolicy, Teacher, TeacherCallError
from lightning_kd.teachers.codecs import Codec, JsonCodec, NpyCodec
from lightning_kd.teachers.local import FrozenTeacher, load_teacher, state_fingerprint, teacher_fingerprint
from lightning_kd.teachers.remote import RemoteTeacher

__all__ = [
    "Codec",
    "FrozenTeacher",
    "JsonCodec",
    "NpyCodec",
    "RemoteTeacher",
    "RetryPolicy",
    "Teacher",
    "TeacherCallError",
    "load_teacher",
    "state_fingerprint",
    "teacher_fingerprint",
]
