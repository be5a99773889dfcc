#!/bin/sh
# Input: any text on stdin. Output: "count word" lines, most frequent first.
# Words are runs of letters, folded to lower case.
set -eu
tr -cs '[:alpha:]' '\n' | tr '[:upper:]' '[:lower:]' | grep -v '^$' | sort | uniq -c | sort -k1,1nr -k2 | head -n 10
