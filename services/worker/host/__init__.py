"""The worker host's side: the service that reports its device and answers probes, the supervisor of one
process per replica (with its fork server), and the device probe."""
