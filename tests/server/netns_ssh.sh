#!/bin/sh
# mpirun's ssh for the two-machine test: each "machine" is a network namespace of this host named like its
# host, entered with a hostname of its own (a UTS namespace), so that Open MPI and megakv see two hosts, as on
# two machines. Like ssh, it runs its arguments, joined by spaces, as one shell command there:
#   netns_ssh.sh HOST COMMAND...
host=$1
shift
exec ip netns exec "$host" unshare --uts sh -c 'hostname "$1" && shift && exec sh -c "$*"' sh "$host" "$@"
