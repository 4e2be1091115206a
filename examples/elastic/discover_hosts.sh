#!/bin/sh
# Host discovery for horovodrun's elastic mode (--host-discovery-script): print one "host:slots" line per
# host that may train now. horovodrun runs it about once a second; a host that appears is added at the next
# checkpoint, one that disappears is removed, and a host whose worker failed stays out (blacklisted).
#
# The hosts come from a file, one "host:slots" per line ("#" starts a comment), by default hosts.txt next
# to this script; set PARTIALFC_HOSTS_FILE to use another. Edit the file to grow or shrink the job, or
# replace this script with one that asks your scheduler or cloud API.
hosts_file="${PARTIALFC_HOSTS_FILE:-$(dirname "$0")/hosts.txt}"
if [ ! -r "$hosts_file" ]; then
    echo "discover_hosts.sh: cannot read the hosts file $hosts_file (set PARTIALFC_HOSTS_FILE)" >&2
    exit 1
fi
sed -e 's/#.*//' -e 's/[[:space:]]//g' "$hosts_file" | grep -v '^$'
