"""The de-identification subsystem (PS3.15) and the audit that gates the safe haven.

Imports run one way: ``profile`` (codes, option lists, identifying keywords, coding schemes)
and ``table`` (the generated action table ``data/ps315_basic_profile.csv``, made by ``ps315``)
import nothing of haven's stages; ``options``, ``header`` (the element actions), ``dicomfile``,
``writer`` and ``dicomraw`` (raw-element reading and writing), ``redact`` (pixel text),
``deface`` and ``images`` (image metadata) build on them; ``anonymize`` is the stage (and its
shard merge).  The audit - ``identifiers`` (what ingest saw), ``scan`` (reading every output)
and ``audit`` (the gate) - may read the profile; the profile never reads the audit.
"""
