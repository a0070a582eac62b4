"""The worker host's side: the service that reports its device and answers probes, the supervisor of one
process per replica (with its fork server), the host's preloader (which forks those fork servers, its imports
done), and the device probe."""
