"""The image server (sd_tasks.serving): its registry follower, and the real server over HTTP."""
