#!/usr/bin/env python3
"""Shows that each alert's promtool tests can fail: replaces one alert's expression at a time by
one that never fires, then by one that always fires, and expects `promtool test rules` to fail
every time. Restores the rule file at the end. About 20 promtool runs (minutes on 2 busy cores).

    python3 deploy/prometheus/mutation-check.py
"""
import os, re, shutil, subprocess, sys, tempfile

os.chdir(os.path.dirname(os.path.abspath(__file__)))
src = open("flattend.rules.yml").read()
alerts = re.findall(r"- alert: (\w+)\n\s+expr: (.+)\n", src)
backup = tempfile.mktemp()
shutil.copy("flattend.rules.yml", backup)
survived = []
try:
    for name, expr in alerts:
        metric = re.search(r"(up|flattend_[a-z_]+)", expr).group(1)
        always = "vector(1)" if "absent" in expr else metric + " >= 0"
        for label, new in (("never fires", "vector(1) == 0"), ("always fires", always)):
            open("flattend.rules.yml", "w").write(src.replace("expr: " + expr, "expr: " + new, 1))
            r = subprocess.run(["promtool", "test", "rules", "flattend.rules.test.yml"], capture_output=True, text=True)
            print(f"{name:34} {label:13} -> {'caught' if r.returncode else 'NOT CAUGHT'}", flush=True)
            if r.returncode == 0:
                survived.append((name, label))
finally:
    shutil.copy(backup, "flattend.rules.yml")
    os.remove(backup)
sys.exit(1 if survived else 0)
