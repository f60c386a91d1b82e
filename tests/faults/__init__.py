"""Fault injection against a real trioproxy: a raw-socket client toolkit (:mod:`.client`), a
backend that records what reached it and misbehaves on command (:mod:`.backend`) and the
proxy-under-test harness that checks, after every family, that trioproxy is alive, answers and
gave back its file descriptors (:mod:`.harness`)."""
