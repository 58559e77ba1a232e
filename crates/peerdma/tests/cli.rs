//! The `peerdma` command as a user runs it.

use std::process::Command;

fn peerdma(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn example(name: &str) -> String {
    format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn topo_without_a_fabric_shows_the_built_in_server() {
    let (code, out, err) = peerdma(&["topo"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("built-in example fabric gpu-server.toml"));
    assert!(out.contains("0000:03:00.0 endpoint gpu0  10de:2330"));
    assert!(out.contains("0000:02:00.0 switch_downstream  1000:c030  ACS[SV UF]"));
    assert!(out.contains("BAR2 mem64 pref 128G"));
    assert!(out.contains("VF of 0000:04:00.0"));
    assert!(out.contains("peer-to-peer forwarding: any"));
}

#[test]
fn topo_json_follows_the_contract() {
    let (code, out, err) = peerdma(&[
        "topo",
        "--json",
        "--fabric",
        &example("gpu-nic-switch.toml"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["platform"]["cpu"]["vendor"], "intel");
    assert_eq!(v["platform"]["cpu"]["family"], 6);
    let hb = &v["host_bridges"][0];
    for k in ["name", "domain", "bus", "p2p", "mmio"] {
        assert!(hb.get(k).is_some(), "host bridge lacks {k}");
    }
    assert_eq!(hb["p2p"], true);
    assert_eq!(hb["mmio"][1]["cpu"].as_u64(), Some(0x80_0000_0000));
    assert_eq!(hb["mmio"][1]["size"].as_u64(), Some(256 << 30));
    let devices = v["devices"].as_array().unwrap();
    let gpu = devices.iter().find(|d| d["name"] == "gpu0").unwrap();
    for k in [
        "bdf", "kind", "name", "parent", "vendor", "device", "acs", "bars",
    ] {
        assert!(gpu.get(k).is_some(), "device lacks {k}");
    }
    assert_eq!(gpu["bdf"], "0000:03:00.0");
    assert_eq!(gpu["kind"], "endpoint");
    assert_eq!(gpu["parent"], "0000:02:00.0");
    assert_eq!(gpu["vendor"], 0x10de);
    assert_eq!(gpu["device"], 0x2330);
    let bar2 = gpu["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["index"] == 2)
        .unwrap();
    assert_eq!(bar2["type"], "mem64");
    assert_eq!(bar2["prefetch"], true);
    assert_eq!(bar2["size"].as_u64(), Some(64 << 30));
    assert!(bar2["cpu_addr"].is_u64() && bar2["bus_addr"].is_u64());
    let rp = devices.iter().find(|d| d["bdf"] == "0000:00:01.0").unwrap();
    assert_eq!(rp["parent"], "hb0");
    assert_eq!(rp["acs"], serde_json::json!(["SV", "RR", "CR", "UF"]));
}

#[test]
fn every_example_prints() {
    for name in [
        "gpu-server.toml",
        "gpu-nic-switch.toml",
        "two-root-ports-acs.toml",
        "arm-offset.toml",
        "sriov-nic.toml",
        "two-host-bridges.toml",
    ] {
        let (code, out, err) = peerdma(&["topo", "--fabric", &example(name)]);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(
            out.contains(&format!("fabric file {}", example(name))),
            "{name}"
        );
    }
}

#[test]
fn bad_input_exits_2_with_a_plain_message() {
    let dir = std::env::temp_dir().join(format!("peerdma-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[platform]\ncpu = { vendor = \"intel\" }\n\n[[device]]\nbdf = \"0000:01:00.0\"\nkind = \"endpoint\"\nparent = \"nowhere\"\n").unwrap();
    let (code, out, err) = peerdma(&["topo", "--fabric", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert_eq!(
        err.trim(),
        format!(
            "peerdma: {}:7: device[0].parent: unknown parent \"nowhere\": no host bridge, device name or device address",
            bad.display()
        )
    );
    let (code, _, err) = peerdma(&[
        "topo",
        "--fabric",
        dir.join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the file"));
    let (code, _, _) = peerdma(&["topo", "--bogus"]);
    assert_eq!(code, 2, "clap usage errors also exit 2");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn topo_matrix_shows_every_outcome_with_legend_and_footnotes() {
    let (code, out, err) = peerdma(&[
        "topo",
        "--matrix",
        "--fabric",
        &example("two-root-ports-acs.toml"),
    ]);
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("0000:03:00.0 (nvme0)"))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().skip(2).collect();
    assert_eq!(cells, vec!["X", "HB4*", "HB6"]);
    assert!(out.contains("BUSn  switch-local"));
    assert!(
        out.contains(
            "0000:02:00.0: ACS SV RR CR UF; 2 pair(s); pci=disable_acs_redir=0000:02:00.0"
        )
    );
    let (_, out, _) = peerdma(&["topo", "--matrix", "--fabric", &example("arm-offset.toml")]);
    let row = out
        .lines()
        .find(|l| l.starts_with("0000:05:00.0 (nvme0)"))
        .unwrap();
    assert!(row.contains("NO"), "{row}");
    assert!(
        out.lines()
            .find(|l| l.starts_with("0000:03:00.0 (acc0)"))
            .unwrap()
            .contains("BUS4")
    );
}

#[test]
fn topo_json_with_matrix_lists_every_ordered_pair() {
    let (code, out, err) = peerdma(&["topo", "--json", "--matrix"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["devices"].is_array(), "the topo JSON is still there");
    let pairs = v["p2p"].as_array().unwrap();
    // gpu-server: 9 providers, 9 clients, all providers are clients: 9 × 9 − 9 ordered pairs.
    assert_eq!(pairs.len(), 72);
    let gpu_nvme = pairs
        .iter()
        .find(|p| p["provider"] == "0000:03:00.0" && p["client"] == "0000:07:00.0")
        .unwrap();
    assert_eq!(gpu_nvme["map_type"], "thru_host_bridge");
    assert_eq!(gpu_nvme["distance"], 6);
    assert!(gpu_nvme["acs_redirect"].is_array());
    assert!(
        gpu_nvme["reason"]
            .as_str()
            .unwrap()
            .contains("share no upstream bridge")
    );
    let gpu_nic = pairs
        .iter()
        .find(|p| p["provider"] == "0000:03:00.0" && p["client"] == "0000:04:00.0")
        .unwrap();
    assert_eq!(gpu_nic["map_type"], "bus_addr");
    assert_eq!(gpu_nic["distance"], 4);
    assert!(pairs.iter().all(|p| p["provider"] != p["client"]));
    let (_, out, _) = peerdma(&[
        "topo",
        "--json",
        "--matrix",
        "--fabric",
        &example("two-root-ports-acs.toml"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = v["p2p"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "0000:03:00.0" && p["client"] == "0000:04:00.0")
        .unwrap()
        .clone();
    assert_eq!(
        p["acs_redirect"],
        serde_json::json!(["0000:02:00.0", "0000:02:01.0"])
    );
}

#[test]
fn explain_by_name_or_address() {
    let (code, out, err) = peerdma(&[
        "explain",
        "nvme0",
        "0000:04:00.0",
        "--fabric",
        &example("two-root-ports-acs.toml"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Provider 0000:03:00.0 (nvme0) → client 0000:04:00.0 (nvme1)"));
    assert!(out.contains("0000:01:00.0"));
    assert!(out.contains("(common upstream bridge)"));
    assert!(out.contains("← redirects peer requests upstream"));
    assert!(
        out.contains("Decision: thru_host_bridge (PCI_P2PDMA_MAP_THRU_HOST_BRIDGE), distance 4")
    );
    assert!(out.contains("pci=disable_acs_redir=0000:02:00.0;0000:02:01.0"));
    let (code, out, _) = peerdma(&[
        "explain",
        "acc0",
        "nvme0",
        "--json",
        "--fabric",
        &example("arm-offset.toml"),
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["map_type"], "not_supported");
    assert_eq!(
        v["host_bridge"]["bridges"][0]["allowlist"],
        serde_json::Value::Null
    );
    assert_eq!(v["host_bridge"]["bridges"][0]["vendor"], 0x1def);
    let (code, _, err) = peerdma(&["explain", "gpu0", "nobody"]);
    assert_eq!(code, 2);
    assert!(err.contains("no PCI function named or addressed \"nobody\""));
}

#[test]
fn topo_host_reads_a_captured_machine() {
    let root = format!(
        "{}/../peerdma-linux/tests/fixtures/qemu-guest",
        env!("CARGO_MANIFEST_DIR")
    );
    let (code, out, err) = peerdma(&["topo", "--host", "--sysfs-root", &root]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pci0000:00  domain 0000 root bus 00"));
    assert!(out.contains("0000:00:01.0 root_port  1b36:000c  ACS[SV RR CR UF]"));
    assert!(out.contains("0000:03:00.0 endpoint  1af4:1110"));
    assert!(out.contains("driver vfio-pci, iommu group"));
    let (code, out, _) = peerdma(&["topo", "--host", "--sysfs-root", &root, "--matrix"]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with("0000:03:00.0")).unwrap();
    assert!(row.contains("BUS4"), "{row}");
    let (code, _, err) = peerdma(&["topo", "--host", "--sysfs-root", "/nonexistent"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot list /sys/bus/pci/devices"), "{err}");
}

#[test]
fn export_and_import_errors_name_the_errno_and_what_it_means() {
    let (code, _, err) = peerdma(&[
        "export",
        "--device",
        "0000:fe:1f.7",
        "--bar",
        "2",
        "--range",
        "0:4K",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("opening 0000:fe:1f.7: ENODEV (No such device): no such PCI device"),
        "{err}"
    );
    let (code, _, err) = peerdma(&[
        "export",
        "--device",
        "0000:00:01.0",
        "--bar",
        "2",
        "--range",
        "4K",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("is not OFF:LEN"), "{err}");
    let (code, _, err) = peerdma(&[
        "import",
        "--provider",
        "bogus",
        "--bar",
        "2",
        "--range",
        "0:4K",
        "--importer",
        "0000:00:01.0",
        "--iova",
        "0x1000",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a PCI address"), "{err}");
}

#[test]
fn demo_tells_the_story_and_every_step_holds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .arg("demo")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for step in [
        "export",
        "nic-dma",
        "iommufd-dma",
        "flr",
        "old-addresses-fault",
        "revoked-maps-refused",
        "memory-back",
        "closed",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(step)),
            "{step} in\n{text}"
        );
    }
}

#[test]
fn demo_json_is_one_event_per_line_and_a_bad_cast_exits_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(["demo", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 9);
    assert!(events.iter().all(|e| e["ok"] == true));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(["demo", "--far", "nvme9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

fn scenarios() -> String {
    format!("{}/../../scenarios", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn scenario_run_passes_every_file_on_the_emulated_machine() {
    let (code, out, err) = peerdma(&["scenario", "run", &scenarios()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("memory-off-revokes — Memory decode off revokes"));
    assert!(
        out.contains(" 0 failed, 0 pending"),
        "{}",
        out.lines().last().unwrap()
    );
    let (code, out, _) = peerdma(&[
        "scenario",
        "run",
        &format!("{}/export-not-a-bar.toml", scenarios()),
        "--json",
    ]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[1]["do"], "export");
    assert_eq!(lines[1]["outcome"], "ENODEV");
    assert_eq!(lines[1]["pass"], true);
}

#[test]
fn scenario_errors_are_plain() {
    let dir = std::env::temp_dir().join(format!("peerdma-scn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "about = \"x\"\n[[step]]\ndo = \"open\"\ndev = 3\nas = \"p\"\n",
    )
    .unwrap();
    let (code, _, err) = peerdma(&["scenario", "run", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.trim(), "peerdma: bad: step[1].dev: must be a string");
    let (code, _, err) = peerdma(&["scenario", "run", &scenarios(), "--backend", "qemu"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown backend \"qemu\""), "{err}");
    // A scenario whose expectation is wrong fails the run with exit 1.
    let wrong = dir.join("wrong.toml");
    std::fs::write(
        &wrong,
        "about = \"x\"\n[[step]]\ndo = \"open\"\ndev = \"provider\"\nas = \"p\"\n\
         [[step]]\ndo = \"export\"\ndev = \"p\"\nregion = 6\nranges = [[0, \"4K\"]]\nexpect = \"EINVAL\"\n",
    )
    .unwrap();
    let (code, out, _) = peerdma(&["scenario", "run", wrong.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("ENODEV") && out.contains("FAILED"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn scenario_compare_prints_the_table_and_fails_on_an_undocumented_disagreement() {
    let dir = std::env::temp_dir().join(format!("peerdma-cmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("{}/export-unaligned.toml", scenarios());
    let (_, json, _) = peerdma(&["scenario", "run", &file, "--json"]);
    let real = dir.join("real.jsonl");
    let none = dir.join("none.md");
    std::fs::write(&none, "nothing documented\n").unwrap();
    // The guest's console around the results is ignored.
    std::fs::write(
        &real,
        format!("[    1.0] booting\n{json}PEERDMA-END rc=0\n"),
    )
    .unwrap();
    let args = |d: &std::path::Path| {
        vec![
            "scenario".to_string(),
            "compare".into(),
            file.clone(),
            "--real".into(),
            real.to_str().unwrap().into(),
            "--divergences".into(),
            d.to_str().unwrap().into(),
        ]
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        peerdma(&a)
    };
    let (code, out, err) = run(args(&none));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("scenario "), "{out}");
    assert!(out.contains("TEST scenario:export-unaligned ... ok"));
    assert!(out.contains("scenario steps: 5 passed, 0 failed"), "{out}");
    // The real kernel answered differently at step 3.
    let changed = json.replacen(
        "\"step\":3,\"do\":\"export\",\"expect\":\"EINVAL\",\"outcome\":\"EINVAL\"",
        "\"step\":3,\"do\":\"export\",\"expect\":\"EINVAL\",\"outcome\":\"EFAULT\"",
        1,
    );
    assert_ne!(changed, json);
    std::fs::write(&real, changed).unwrap();
    let (code, out, _) = run(args(&none));
    assert_eq!(code, 1);
    assert!(out.contains("DISAGREE"), "{out}");
    assert!(out.contains(
        "TEST scenario:export-unaligned ... FAILED: step 3 DISAGREE: emulated \"EINVAL\", real \"EFAULT\""
    ));
    // Documented, it passes.
    let doc = dir.join("div.md");
    std::fs::write(&doc, "| 9 | … | see scenario `export-unaligned` step 3 |\n").unwrap();
    let (code, out, _) = run(args(&doc));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("divergence (documented)"));
    std::fs::remove_dir_all(&dir).ok();
}
