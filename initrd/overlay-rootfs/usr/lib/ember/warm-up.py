# The warm-up after a reset of a VM whose last call was Python: forking
# this translates the fork server's path and the interpreter loop again.
