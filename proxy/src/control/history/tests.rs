use super::*;

fn config(weight: &str) -> String {
    format!(
        r#"{{"schema_version": 1,
  "upstreams": {{"v1": {{"endpoints": ["127.0.0.1:9000"]}}, "v2": {{"endpoints": ["127.0.0.1:9001"]}}}},
  "routes": [{{"name": "default", "split": [{{"upstream": "v2", "weight": "{weight}"}}, {{"upstream": "v1", "weight": "rest"}}]}}]}}"#
    )
}

fn sources(main: &Path, text: &str) -> Sources {
    Sources {
        main: (main.to_path_buf(), text.as_bytes().to_vec()),
        include_dir: None,
        fragments: Vec::new(),
    }
}

#[test]
fn records_changes_with_a_summary_skips_repeats_and_keeps_the_newest() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let main = dir.path().join("tidegate.json");
    let h = History::new(&dir.path().join("data"), 3).expect("keeps some");
    assert_eq!(
        h.record(&sources(&main, &config("1%")), 1, 0xa, "start"),
        Ok(1)
    );
    // A restart on the same content adds nothing.
    assert_eq!(
        h.record(&sources(&main, &config("1%")), 1, 0xa, "start"),
        Ok(1)
    );
    assert_eq!(
        h.record(&sources(&main, &config("5%")), 2, 0xb, "watch"),
        Ok(2)
    );
    let (listed, errors) = h.list();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].meta.summary, "routes: ~default (4.0000% v1 → v2)");
    assert_eq!(listed[1].meta.summary, "first recorded config");
    assert_eq!(
        (
            listed[0].meta.hash.as_str(),
            listed[0].meta.trigger.as_str()
        ),
        ("000000000000000b", "watch")
    );
    for (i, w) in ["6%", "7%", "8%"].iter().enumerate() {
        h.record(
            &sources(&main, &config(w)),
            3 + i as u64,
            0xc + i as u64,
            "watch",
        )
        .expect("recorded");
    }
    let ids: Vec<u64> = h.list().0.iter().map(|e| e.meta.id).collect();
    assert_eq!(ids, vec![5, 4, 3]);
    assert!(History::new(dir.path(), 0).is_none());
}

#[test]
fn a_taken_id_is_never_overwritten_and_a_corrupt_entry_is_reported() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let main = dir.path().join("tidegate.json");
    let h = History::new(dir.path(), 10).expect("keeps some");
    h.record(&sources(&main, &config("1%")), 1, 1, "start")
        .expect("recorded");
    // Another writer takes ID 2 between our listing and our write: simulated by a file
    // that is already there when the write happens.
    let mut e = h.get(1).expect("entry 1");
    e.meta.id = 2;
    h.write_new(&mut e).expect("written");
    assert_eq!(e.meta.id, 2);
    let mut again = h.get(1).expect("entry 1");
    again.meta.id = 2;
    h.write_new(&mut again).expect("written under the next ID");
    assert_eq!(again.meta.id, 3);
    std::fs::write(h.path_of(2), b"{ not json").expect("corrupting");
    let (listed, errors) = h.list();
    assert_eq!(
        listed.iter().map(|e| e.meta.id).collect::<Vec<_>>(),
        vec![3, 1]
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("00000002.json: not a history entry"),
        "{errors:?}"
    );
}

/// A main file that includes `conf.d`, as [`with_include_dir`] lays it out.
const MAIN_WITH_INCLUDE: &str = r#"{"schema_version": 1, "include_dir": "conf.d",
        "upstreams": {"v1": {"endpoints": ["127.0.0.1:9000"]}},
        "routes": [{"name": "default", "upstream": "v1"}]}"#;

/// The main file's path in `dir` and its include directory, created.
fn with_include_dir(dir: &Path) -> (PathBuf, PathBuf) {
    let conf_d = dir.join("conf.d");
    std::fs::create_dir(&conf_d).expect("mkdir");
    (dir.join("tidegate.json"), conf_d)
}

#[test]
fn rollback_writes_the_files_back_and_moves_new_fragments_aside() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (main, conf_d) = with_include_dir(dir.path());
    let frag = conf_d.join("limits.json");
    let frag_text = r#"{"limits": [{"name": "per-user", "key": ["user"], "rate": "5/s"}]}"#;
    let h = History::new(&dir.path().join("data"), 5).expect("keeps some");
    let src = Sources {
        main: (main.clone(), MAIN_WITH_INCLUDE.as_bytes().to_vec()),
        include_dir: Some(conf_d.clone()),
        fragments: vec![(frag.clone(), frag_text.as_bytes().to_vec())],
    };
    h.record(&src, 1, 1, "start").expect("recorded");

    // Later edits: the main file changed, a fragment added.
    std::fs::write(&main, "{ broken").expect("writing");
    std::fs::write(&frag, "{}").expect("writing");
    let extra = conf_d.join("zz-extra.json");
    std::fs::write(&extra, r#"{"limits": []}"#).expect("writing");

    let (written, moved) = rollback(&h.get(1).expect("entry 1")).expect("rolled back");
    assert_eq!(written, vec![frag.clone(), main.clone()]);
    assert_eq!(
        std::fs::read_to_string(&main).expect("main"),
        MAIN_WITH_INCLUDE
    );
    assert_eq!(std::fs::read_to_string(&frag).expect("fragment"), frag_text);
    assert!(!extra.exists());
    assert_eq!(moved.len(), 1);
    assert!(
        moved[0]
            .display()
            .to_string()
            .contains("zz-extra.json.replaced-")
    );
    // Nothing but the files themselves is left in the directories.
    let names: Vec<String> = std::fs::read_dir(&conf_d)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn an_entry_that_does_not_load_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let main = dir.path().join("tidegate.json");
    let h = History::new(dir.path(), 5).expect("keeps some");
    h.record(&sources(&main, &config("1%")), 1, 1, "start")
        .expect("recorded");
    let mut e = h.get(1).expect("entry 1");
    e.files[0].text = config("250%");
    std::fs::write(&main, "live").expect("writing");
    let err = rollback(&e).expect_err("refused");
    assert!(err.contains("does not load"), "{err}");
    assert_eq!(std::fs::read_to_string(&main).expect("main"), "live");
}

#[test]
fn a_file_that_cannot_be_staged_leaves_every_file_as_it_was() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (main, conf_d) = with_include_dir(dir.path());
    let frag = conf_d.join("limits.json");
    let h = History::new(&dir.path().join("data"), 5).expect("keeps some");
    let src = Sources {
        main: (main.clone(), MAIN_WITH_INCLUDE.as_bytes().to_vec()),
        include_dir: Some(conf_d.clone()),
        fragments: vec![(frag.clone(), br#"{"limits": []}"#.to_vec())],
    };
    h.record(&src, 1, 1, "start").expect("recorded");
    std::fs::write(&main, "live").expect("writing");
    std::fs::write(&frag, "{}").expect("writing");
    let extra = conf_d.join("zz-extra.json");
    std::fs::write(&extra, "{}").expect("writing");
    // The main file's staging name is taken by a directory: its write fails, after the
    // fragment's succeeded.
    let blocker = dir
        .path()
        .join(format!(".tidegate.json.rollback-{}", std::process::id()));
    std::fs::create_dir(&blocker).expect("mkdir");

    let err = rollback(&h.get(1).expect("entry 1")).expect_err("refused");
    assert!(err.contains("rollback-"), "{err}");
    assert_eq!(std::fs::read_to_string(&main).expect("main"), "live");
    assert_eq!(std::fs::read_to_string(&frag).expect("fragment"), "{}");
    assert!(extra.exists(), "nothing moved aside");
    let left: Vec<String> = std::fs::read_dir(&conf_d)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "no staged file left behind: {left:?}");
}
