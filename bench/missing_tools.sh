#!/usr/bin/env bash
# compare_g.sh checks its tools before it builds or runs anything (issue "Hardening", item 17): run with a PATH
# that has every tool of this machine but python3, it must stop at once with the apt line, run no benchmark and
# write no result. A ctest of bench/CMakeLists.txt (bench_compare_g_missing_tools).
#   bench/missing_tools.sh COMPARE_G BUILD_DIR WORK_DIR
set -u
compare_g=$1 build=$2 work=$3
rm -rf "$work" && mkdir -p "$work/bin" || exit 1
# The machine's tools without python3: a directory of links, the first of each name winning, as PATH would.
for tool in /usr/local/bin/* /usr/bin/* /bin/*; do
  name=${tool##*/}
  [[ $name == python3* || -d $tool || -e $work/bin/$name || -L $work/bin/$name ]] && continue
  ln -s "$tool" "$work/bin/$name"
done
out=$(PATH="$work/bin" timeout 60 bash "$compare_g" --smoke --no-build --build "$build" --out "$work/out" 2>&1)
rc=$?
if [[ $rc == 0 || $out != *"compare_g.sh: missing python3. On Debian 12:"* || $out != *"apt-get install"* ]]; then
  printf 'compare_g.sh without python3 should stop with the apt line (exit %s):\n%s\n' "$rc" "$out" >&2
  exit 1
fi
if [[ $out == *"benchmarks"* || -e $work/out ]]; then
  printf 'compare_g.sh without python3 ran or wrote something before stopping:\n%s\n' "$out" >&2
  exit 1
fi
echo "compare_g.sh without python3: stopped at once with the apt line"
