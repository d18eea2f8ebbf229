//! The merge's specification, in two parts.
//!
//! Each `check` row states one rule: a fixture (field authority, targets, the stored
//! record, then the changes and acknowledgements to apply in order) and the rendered
//! result of the last merge in it: the rule per proposed field, the outcome, the new
//! agreed record, the planned writes, and the pending, diverged and deleted marks the
//! shadows carry afterwards.
//!
//! The property tests state the laws every merge keeps, over small random records: a
//! few fields, four systems, random authority and targets, and values from a domain
//! small enough that systems often hold the same value.

use std::collections::{BTreeMap, BTreeSet};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::subsequence;
use serde_json::json;

use super::*;
use crate::config::{DefaultPolicy, NonOwnerPolicy, OnDelete};
use crate::model::{AgreedField, Change, ChangeKind, Fields, GlobalId, Provenance, RecordState, Shadow, TimeMs, Value};

// ---------------------------------------------------------------------------------
// The table: one fixture and its expected rendering per rule.
// ---------------------------------------------------------------------------------

/// Merges the fixture's steps and compares the rendered result with `expect`.
///
/// Fixture lines (values are JSON without spaces, times are `@ms`):
///
/// ```text
/// field email owners=hr,crm [equal] [non_owner=revert|ignore|flag]
/// default last_writer|first_writer
/// delete_from crm,hr
/// target lms [dry_run|outside_rollout] [create_only|update_only|read_only]
///            [fields=email,name] [on_delete=propagate|ignore|soft:active=false]
/// agreed email="a" by crm @10
/// tombstone
/// shadow lms [id=L1] email="a" [pending email="b"] [diverged email] [deleted]
/// change lms @20 email="b"            (an upsert from lms)
/// delete lms @20
/// confirm lms [id=L1] email="b"       (confirm_write of an acknowledged write)
/// abandon lms email="b"               (abandon_write of a dead-lettered write)
/// ```
///
/// Without `agreed`, `tombstone` or `shadow` lines the first change is a first
/// sighting (no stored state). A target writes every field the fixture names unless
/// `fields=` says otherwise. Shadows and changes use the local id `<system>-1` unless
/// `id=` says otherwise; the rendering names an id only when it is another one, and
/// `no_id` for a system whose id concord does not know yet.
#[track_caller]
fn check(fixture: &str, expect: &str) {
    let fixture = Fixture::parse(fixture);
    let (state, last) = fixture.run();
    assert_summary_matches(&last.decision, &last.writes);
    let actual = render(&state, &last.decision, &last.writes);
    let expect = expect
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    if actual != expect {
        panic!("merge result differs\n--- expected\n{expect}\n--- actual\n{actual}\n");
    }
}

#[test]
fn unchanged_field_is_not_a_proposal() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        agreed email="a" by crm @10
        agreed name="n" by lms @5
        shadow crm email="a" name="n"
        shadow lms email="a" name="n"
        change lms @20 email="a" name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed email="a" by crm @10
        agreed name="m" by lms @20
        write crm send: upsert name="m"
        shadow crm: pending name="m"
        "#,
    );
}

#[test]
fn echo_of_our_own_write_is_already_agreed() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        agreed email="b" by crm @20
        shadow crm email="b"
        shadow lms email="a" pending email="b"
        change lms @25 email="b"
        "#,
        r#"
        email: already_agreed
        outcome: noop
        agreed email="b" by crm @20
        "#,
    );
}

#[test]
fn owner_change_is_accepted_and_written_to_the_others() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        target hr
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        shadow hr email="a"
        change crm @20 email="b"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="b" by crm @20
        write hr send: upsert email="b"
        write lms send: upsert email="b"
        shadow hr: pending email="b"
        shadow lms: pending email="b"
        "#,
    );
}

#[test]
fn non_owner_change_is_reverted() {
    check(
        r#"
        field email owners=crm non_owner=revert
        target crm
        target lms
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        change lms @20 email="x"
        "#,
        r#"
        email: non_owner revert
        outcome: noop
        agreed email="a" by crm @10
        write lms send: upsert email="a"
        shadow lms: pending email="a"
        "#,
    );
}

#[test]
fn non_owner_change_is_ignored_and_the_system_keeps_its_value() {
    check(
        r#"
        field email owners=crm non_owner=ignore
        target crm
        target lms
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        change lms @20 email="x"
        "#,
        r#"
        email: non_owner ignore
        outcome: noop
        agreed email="a" by crm @10
        shadow lms: diverged email
        "#,
    );
}

#[test]
fn ignored_field_is_not_written_while_its_agreed_value_stays() {
    check(
        r#"
        field email owners=crm non_owner=ignore
        target crm
        target lms
        agreed email="a" by crm @10
        agreed name="n" by crm @10
        shadow crm email="a" name="n"
        shadow lms email="a" name="n"
        change lms @20 email="x"
        change crm @30 name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed email="a" by crm @10
        agreed name="m" by crm @30
        write lms send: upsert name="m"
        shadow lms: pending name="m" diverged email
        "#,
    );
}

#[test]
fn ignored_field_is_written_again_when_the_owner_changes_it() {
    check(
        r#"
        field email owners=crm non_owner=ignore
        target crm
        target lms
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        change lms @20 email="x"
        change crm @30 email="b"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="b" by crm @30
        write lms send: upsert email="b"
        shadow lms: pending email="b"
        "#,
    );
}

#[test]
fn non_owner_change_is_flagged_for_review() {
    check(
        r#"
        field email owners=crm non_owner=flag
        target crm
        target lms
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        change lms @20 email="x"
        "#,
        r#"
        email: non_owner flag
        outcome: noop flagged
        agreed email="a" by crm @10
        shadow lms: diverged email
        "#,
    );
}

#[test]
fn higher_owner_wins_over_lower_owner() {
    check(
        r#"
        field email owners=hr,crm
        target crm
        target hr
        agreed email="c" by crm @10
        shadow crm email="c"
        shadow hr email="c"
        change hr @5 email="h"
        "#,
        r#"
        email: owner_precedence
        outcome: updated
        agreed email="h" by hr @5
        write crm send: upsert email="h"
        shadow crm: pending email="h"
        "#,
    );
}

#[test]
fn lower_owner_is_rejected_when_the_higher_set_the_value() {
    check(
        r#"
        field email owners=hr,crm
        target crm
        target hr
        agreed email="h" by hr @5
        shadow crm email="h"
        shadow hr email="h"
        change crm @20 email="c"
        "#,
        r#"
        email: lower_precedence revert
        outcome: noop
        agreed email="h" by hr @5
        write crm send: upsert email="h"
        shadow crm: pending email="h"
        "#,
    );
}

#[test]
fn lower_owner_is_accepted_when_it_set_the_value_itself() {
    check(
        r#"
        field email owners=hr,crm
        target crm
        target hr
        agreed email="c" by crm @10
        shadow crm email="c"
        shadow hr email="c"
        change crm @20 email="d"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="d" by crm @20
        write hr send: upsert email="d"
        shadow hr: pending email="d"
        "#,
    );
}

#[test]
fn lower_owner_is_accepted_when_no_owner_set_the_value() {
    check(
        r#"
        field email owners=hr,crm
        target crm
        target lms
        agreed email="l" by lms @30
        shadow crm email="l"
        shadow lms email="l"
        change crm @20 email="c"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="c" by crm @20
        write lms send: upsert email="c"
        shadow lms: pending email="c"
        "#,
    );
}

#[test]
fn equal_owners_later_source_time_wins() {
    check(
        r#"
        field email owners=crm,hr equal
        target crm
        target hr
        agreed email="c" by crm @10
        shadow crm email="c"
        shadow hr email="c"
        change hr @20 email="h"
        "#,
        r#"
        email: owner_latest
        outcome: updated
        agreed email="h" by hr @20
        write crm send: upsert email="h"
        shadow crm: pending email="h"
        "#,
    );
}

#[test]
fn equal_owners_earlier_source_time_is_stale() {
    check(
        r#"
        field email owners=crm,hr equal non_owner=ignore
        target crm
        target hr
        agreed email="c" by crm @30
        shadow crm email="c"
        shadow hr email="c"
        change hr @20 email="h"
        "#,
        // A stale proposal is always reverted: the system's value lost on time, not on
        // authority, so there is nothing to keep for it.
        r#"
        email: stale revert
        outcome: noop
        agreed email="c" by crm @30
        write hr send: upsert email="c"
        shadow hr: pending email="c"
        "#,
    );
}

#[test]
fn no_owner_later_writer_wins() {
    check(
        r#"
        target crm
        target lms
        agreed name="n" by crm @10
        shadow crm name="n"
        shadow lms name="n"
        change lms @20 name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed name="m" by lms @20
        write crm send: upsert name="m"
        shadow crm: pending name="m"
        "#,
    );
}

#[test]
fn no_owner_earlier_writer_is_stale() {
    check(
        r#"
        target crm
        target lms
        agreed name="n" by crm @10
        shadow crm name="n"
        shadow lms name="n"
        change lms @5 name="m"
        "#,
        r#"
        name: stale revert
        outcome: noop
        agreed name="n" by crm @10
        write lms send: upsert name="n"
        shadow lms: pending name="n"
        "#,
    );
}

#[test]
fn no_owner_first_writer_sets_an_empty_field() {
    check(
        r#"
        default first_writer
        target crm
        target lms
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        change lms @20 name="m"
        "#,
        r#"
        name: first_writer_wins
        outcome: updated
        agreed email="a" by crm @10
        agreed name="m" by lms @20
        write crm send: upsert name="m"
        shadow crm: pending name="m"
        "#,
    );
}

#[test]
fn no_owner_first_writer_is_kept() {
    check(
        r#"
        default first_writer
        target crm
        target lms
        agreed name="n" by crm @10
        shadow crm name="n"
        shadow lms name="n"
        change lms @20 name="m"
        "#,
        r#"
        name: first_writer_kept revert
        outcome: noop
        agreed name="n" by crm @10
        write lms send: upsert name="n"
        shadow lms: pending name="n"
        "#,
    );
}

#[test]
fn non_owner_may_set_a_field_no_owner_has_set() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        agreed email="a" by lms @5
        shadow crm email="a"
        shadow lms email="a"
        change lms @20 email="b"
        "#,
        r#"
        email: last_writer_wins
        outcome: updated
        agreed email="b" by lms @20
        write crm send: upsert email="b"
        shadow crm: pending email="b"
        "#,
    );
}

#[test]
fn owner_reporting_the_agreed_value_takes_its_provenance() {
    check(
        r#"
        field email owners=crm non_owner=revert
        target crm
        target lms
        agreed email="a" by lms @5
        shadow lms email="a"
        change crm @10 email="a"
        "#,
        r#"
        email: already_agreed
        outcome: noop
        agreed email="a" by crm @10
        "#,
    );
}

#[test]
fn non_owner_edit_after_the_owner_confirmed_the_value_is_reverted() {
    check(
        r#"
        field email owners=crm non_owner=revert
        target crm
        target lms
        agreed email="a" by lms @5
        shadow lms email="a"
        change crm @10 email="a"
        change lms @20 email="x"
        "#,
        r#"
        email: non_owner revert
        outcome: noop
        agreed email="a" by crm @10
        write lms send: upsert email="a"
        shadow lms: pending email="a"
        "#,
    );
}

#[test]
fn higher_owner_reporting_the_agreed_value_takes_it_from_a_lower_owner() {
    check(
        r#"
        field email owners=hr,crm
        target crm
        target hr
        agreed email="a" by crm @5
        shadow crm email="a"
        change hr @10 email="a"
        change crm @20 email="b"
        "#,
        r#"
        email: lower_precedence revert
        outcome: noop
        agreed email="a" by hr @10
        write crm send: upsert email="a"
        shadow crm: pending email="a"
        "#,
    );
}

#[test]
fn non_owner_reporting_the_agreed_value_leaves_its_provenance() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        agreed email="a" by crm @5
        shadow crm email="a"
        change lms @10 email="a"
        "#,
        r#"
        email: already_agreed
        outcome: noop
        agreed email="a" by crm @5
        "#,
    );
}

#[test]
fn change_over_a_value_the_system_had_not_seen_is_a_recorded_conflict() {
    // crm set "c" after lms last reported "a"; the write of "c" to lms is still in
    // flight when lms proposes "l". lms wins on time, and because the write of "c"
    // will land after lms's own edit, "l" must be written to lms again.
    check(
        r#"
        target crm
        target lms
        agreed name="c" by crm @20
        shadow crm name="c"
        shadow lms name="a" pending name="c"
        change lms @25 name="l"
        "#,
        r#"
        name: last_writer_wins conflict
        outcome: updated
        agreed name="l" by lms @25
        write crm send: upsert name="l"
        write lms send: upsert name="l"
        shadow crm: pending name="l"
        shadow lms: pending name="l"
        "#,
    );
}

#[test]
fn rejected_conflict_is_recorded_too() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        agreed email="c" by crm @20
        shadow crm email="c"
        shadow lms email="a"
        change lms @25 email="l"
        "#,
        r#"
        email: non_owner revert conflict
        outcome: noop
        agreed email="c" by crm @20
        write lms send: upsert email="c"
        shadow lms: pending email="c"
        "#,
    );
}

#[test]
fn first_sighting_creates_the_record_where_links_may_create() {
    check(
        r#"
        target crm
        target hr update_only
        target lms
        change lms @10 email="x" name="n"
        "#,
        r#"
        email: last_writer_wins
        name: last_writer_wins
        outcome: created
        agreed email="x" by lms @10
        agreed name="n" by lms @10
        write crm send: upsert email="x" name="n"
        shadow crm: no_id pending email="x" name="n"
        "#,
    );
}

#[test]
fn first_sighting_leaves_out_fields_the_system_reports_empty() {
    check(
        r#"
        target crm
        target lms
        change lms @10 email="x" name=null
        "#,
        r#"
        email: last_writer_wins
        outcome: created
        agreed email="x" by lms @10
        write crm send: upsert email="x"
        shadow crm: no_id pending email="x"
        "#,
    );
}

#[test]
fn target_writes_only_the_fields_its_link_maps() {
    check(
        r#"
        target crm
        target lms fields=email
        change crm @10 email="x" name="n"
        "#,
        r#"
        email: last_writer_wins
        name: last_writer_wins
        outcome: created
        agreed email="x" by crm @10
        agreed name="n" by crm @10
        write lms send: upsert email="x"
        shadow lms: no_id pending email="x"
        "#,
    );
}

#[test]
fn read_only_target_gets_no_write() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms
        target hr read_only
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        shadow hr email="a"
        change crm @20 email="b"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="b" by crm @20
        write lms send: upsert email="b"
        shadow lms: pending email="b"
        "#,
    );
}

#[test]
fn create_only_target_is_not_updated() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms create_only
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        change crm @20 email="b"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="b" by crm @20
        "#,
    );
}

#[test]
fn dry_run_and_outside_rollout_writes_are_planned_but_not_pending() {
    check(
        r#"
        field email owners=crm
        target crm
        target lms dry_run
        target hr outside_rollout
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        shadow hr email="a"
        change crm @20 email="b"
        "#,
        r#"
        email: owner
        outcome: updated
        agreed email="b" by crm @20
        write hr outside_rollout: upsert email="b"
        write lms dry_run: upsert email="b"
        "#,
    );
}

#[test]
fn non_owner_change_over_a_pending_revert_is_reverted_again() {
    // concord's write of the agreed value is in flight when the system's own change
    // arrives; the write's acknowledgement, recorded afterwards, cannot tell which
    // landed last, so the agreed value is written once more.
    check(
        r#"
        field title owners=hr non_owner=revert
        target crm
        agreed title="Manager" by hr @10
        shadow crm title="Sales" pending title="Manager"
        change crm @20 title="Chief"
        confirm crm title="Manager"
        "#,
        r#"
        title: non_owner revert conflict
        outcome: noop
        agreed title="Manager" by hr @10
        write crm send: upsert title="Manager"
        "#,
    );
}

#[test]
fn pending_value_is_not_written_twice() {
    check(
        r#"
        target crm
        target lms
        agreed email="b" by crm @20
        agreed name="n" by crm @10
        shadow crm email="b" name="n"
        shadow lms email="a" name="n" pending email="b"
        change crm @30 name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed email="b" by crm @20
        agreed name="m" by crm @30
        write lms send: upsert name="m"
        shadow lms: pending email="b" name="m"
        "#,
    );
}

#[test]
fn delete_from_an_allowed_system_applies_each_link_policy() {
    check(
        r#"
        delete_from crm
        target crm
        target lms
        target hr on_delete=ignore
        target shop on_delete=soft:active=false
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a" pending email="a"
        shadow hr email="a"
        shadow shop email="a"
        delete crm @20
        "#,
        r#"
        record: deleted
        outcome: deleted
        agreed email="a" by crm @10
        tombstone
        write lms send: delete
        write shop send: soft_delete active=false
        shadow crm: deleted
        shadow lms: deleted
        "#,
    );
}

#[test]
fn delete_is_planned_only_where_the_system_holds_the_record() {
    check(
        r#"
        target crm
        target lms
        target hr
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        delete crm @20
        "#,
        r#"
        record: deleted
        outcome: deleted
        agreed email="a" by crm @10
        tombstone
        write lms send: delete
        shadow crm: deleted
        shadow lms: deleted
        "#,
    );
}

#[test]
fn delete_is_not_written_to_links_that_may_not_update() {
    check(
        r#"
        target crm
        target lms create_only
        target hr read_only
        target shop update_only
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        shadow hr email="a"
        shadow shop email="a"
        delete crm @20
        "#,
        r#"
        record: deleted
        outcome: deleted
        agreed email="a" by crm @10
        tombstone
        write shop send: delete
        shadow crm: deleted
        shadow shop: deleted
        "#,
    );
}

#[test]
fn delete_dry_run_is_planned_and_leaves_the_shadow_alone() {
    check(
        r#"
        target crm
        target lms dry_run
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a"
        delete crm @20
        "#,
        r#"
        record: deleted
        outcome: deleted
        agreed email="a" by crm @10
        tombstone
        write lms dry_run: delete
        shadow crm: deleted
        "#,
    );
}

#[test]
fn delete_from_a_system_not_allowed_keeps_the_record() {
    check(
        r#"
        delete_from crm
        target crm
        target lms
        agreed email="b" by crm @10
        shadow crm email="b"
        shadow lms email="a" pending email="b"
        delete lms @20
        "#,
        // lms holds nothing now, so a write of what it lacks would be a partial
        // create; it is written to again once it shows the record.
        r#"
        record: delete_not_allowed
        outcome: noop
        agreed email="b" by crm @10
        shadow lms: deleted
        "#,
    );
}

#[test]
fn delete_of_a_record_never_agreed_leaves_no_tombstone() {
    // Merged twice, as a redelivered capture would: the replay decides the same.
    check(
        r#"
        target crm
        target lms
        delete crm @10
        delete crm @10
        "#,
        r#"
        record: deleted
        outcome: noop
        shadow crm: deleted
        "#,
    );
}

#[test]
fn system_that_deleted_its_copy_gets_no_writes_until_it_shows_the_record() {
    check(
        r#"
        delete_from crm
        target crm
        target lms
        agreed email="a" by crm @10
        shadow crm email="a"
        shadow lms email="a" deleted
        change crm @30 email="b"
        "#,
        r#"
        email: last_writer_wins
        outcome: updated
        agreed email="b" by crm @30
        shadow lms: deleted
        "#,
    );
}

#[test]
fn upsert_after_a_tombstone_resurrects_the_record() {
    check(
        r#"
        target crm
        target lms
        agreed email="a" by crm @10
        tombstone
        shadow crm email="a" deleted
        shadow lms email="a" deleted
        change crm @30 email="b"
        "#,
        r#"
        email: last_writer_wins
        outcome: updated
        agreed email="b" by crm @30
        shadow lms: deleted
        "#,
    );
}

#[test]
fn re_report_from_a_system_that_kept_its_copy_does_not_resurrect() {
    // hr ignores deletes and still holds the record; its next export shows it again,
    // unchanged. That is not a re-creation.
    check(
        r#"
        target crm
        target hr on_delete=ignore
        agreed email="a" by crm @10
        tombstone
        shadow crm email="a" deleted
        shadow hr email="a"
        change hr @30 email="a"
        "#,
        r#"
        outcome: noop
        agreed email="a" by crm @10
        tombstone
        shadow crm: deleted
        "#,
    );
}

#[test]
fn empty_field_left_out_of_a_create_is_not_written_later() {
    check(
        r#"
        target crm
        target lms
        agreed email="x" by lms @10
        agreed phone=null by lms @10
        shadow lms email="x" phone=null
        change lms @20 email="x" phone=null name="n"
        confirm crm id=C1 email="x" name="n"
        change lms @30 email="x" phone=null name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed email="x" by lms @10
        agreed name="m" by lms @30
        agreed phone=null by lms @10
        write crm send: upsert name="m"
        shadow crm: id=C1 pending name="m"
        "#,
    );
}

#[test]
fn confirm_write_clears_pending_and_records_the_new_id() {
    check(
        r#"
        target crm
        target lms
        change lms @10 email="x"
        confirm crm id=C7 email="x"
        "#,
        r#"
        email: last_writer_wins
        outcome: created
        agreed email="x" by lms @10
        write crm send: upsert email="x"
        shadow crm: id=C7
        "#,
    );
}

#[test]
fn confirmed_write_is_not_planned_again() {
    check(
        r#"
        target crm
        target lms
        change lms @10 email="x" name="n"
        confirm crm id=C7 email="x" name="n"
        change lms @20 email="x" name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed email="x" by lms @10
        agreed name="m" by lms @20
        write crm send: upsert name="m"
        shadow crm: id=C7 pending name="m"
        "#,
    );
}

#[test]
fn abandon_write_clears_pending_so_the_write_is_planned_again() {
    check(
        r#"
        target crm
        target lms
        agreed email="a" by crm @10
        agreed name="n" by crm @10
        shadow crm email="a" name="n"
        shadow lms email="a" name="n"
        change crm @20 email="b"
        abandon lms email="b"
        change crm @30 name="m"
        "#,
        r#"
        name: last_writer_wins
        outcome: updated
        agreed email="b" by crm @20
        agreed name="m" by crm @30
        write lms send: upsert email="b" name="m"
        shadow lms: pending email="b" name="m"
        "#,
    );
}

#[test]
fn first_report_of_an_empty_field_is_not_a_proposal() {
    // A system that links an existing record and holds nothing in a field has not
    // changed it; it is filled in rather than emptying the field everywhere.
    check(
        r#"
        field email owners=hr,crm
        target crm
        target hr
        agreed email="c" by crm @10
        shadow crm email="c"
        change hr @20 email=null
        "#,
        r#"
        outcome: noop
        agreed email="c" by crm @10
        write hr send: upsert email="c"
        shadow hr: pending email="c"
        "#,
    );
}

#[test]
fn emptying_a_field_is_a_proposal() {
    check(
        r#"
        field email owners=hr,crm
        target crm
        target hr
        agreed email="c" by crm @10
        shadow crm email="c"
        shadow hr email="c"
        change hr @20 email=null
        "#,
        r#"
        email: owner_precedence
        outcome: updated
        agreed email=null by hr @20
        write crm send: upsert email=null
        shadow crm: pending email=null
        "#,
    );
}

// ---------------------------------------------------------------------------------
// Fixture parsing, running and rendering.
// ---------------------------------------------------------------------------------

/// A target as the tests own it; `Target` borrows from it.
#[derive(Debug, Clone)]
struct TargetSpec {
    system: String,
    fields: BTreeSet<String>,
    may_create: bool,
    may_update: bool,
    on_delete: OnDelete,
    mode: WriteMode,
}

impl TargetSpec {
    fn target(&self) -> Target<'_> {
        Target {
            system: &self.system,
            fields: &self.fields,
            may_create: self.may_create,
            may_update: self.may_update,
            on_delete: &self.on_delete,
            mode: self.mode,
        }
    }
}

enum Step {
    Merge(Change),
    Confirm {
        system: String,
        local_id: String,
        fields: Fields,
    },
    Abandon {
        system: String,
        fields: Fields,
    },
}

struct Fixture {
    policy: EntityPolicy,
    targets: Vec<TargetSpec>,
    state: Option<RecordState>,
    steps: Vec<Step>,
}

impl Fixture {
    fn parse(text: &str) -> Fixture {
        let mut policy = EntityPolicy::default();
        let mut targets: Vec<(TargetSpec, bool)> = Vec::new();
        let mut state = RecordState::default();
        let mut has_state = false;
        let mut steps = Vec::new();
        let mut named: BTreeSet<String> = BTreeSet::new();

        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let rest = &words[1..];
            match words[0] {
                "field" => {
                    let name = rest[0].to_string();
                    let mut field = FieldPolicy::default();
                    for word in &rest[1..] {
                        match word.split_once('=') {
                            Some(("owners", list)) => field.owners = list.split(',').map(String::from).collect(),
                            Some(("non_owner", p)) => field.non_owner = parse_non_owner(p),
                            None if *word == "equal" => field.owners_equal = true,
                            _ => panic!("fixture: unknown field option `{word}`"),
                        }
                    }
                    named.insert(name.clone());
                    policy.fields.insert(name, field);
                }
                "default" => {
                    policy.default = match rest[0] {
                        "last_writer" => DefaultPolicy::LastWriterWins,
                        "first_writer" => DefaultPolicy::FirstWriterWins,
                        other => panic!("fixture: unknown default policy `{other}`"),
                    }
                }
                "delete_from" => policy.delete_allowed_from = rest[0].split(',').map(String::from).collect(),
                "target" => {
                    let mut t = TargetSpec {
                        system: rest[0].to_string(),
                        fields: BTreeSet::new(),
                        may_create: true,
                        may_update: true,
                        on_delete: OnDelete::Propagate,
                        mode: WriteMode::Send,
                    };
                    let mut explicit_fields = false;
                    for word in &rest[1..] {
                        match *word {
                            "dry_run" => t.mode = WriteMode::DryRun,
                            "outside_rollout" => t.mode = WriteMode::OutsideRollout,
                            "create_only" => t.may_update = false,
                            "update_only" => t.may_create = false,
                            "read_only" => (t.may_create, t.may_update) = (false, false),
                            "on_delete=propagate" => t.on_delete = OnDelete::Propagate,
                            "on_delete=ignore" => t.on_delete = OnDelete::Ignore,
                            w if w.starts_with("on_delete=soft:") => {
                                let (field, value) = parse_field_value(&w["on_delete=soft:".len()..]);
                                t.on_delete = OnDelete::SoftDelete { field, value };
                            }
                            w if w.starts_with("fields=") => {
                                t.fields = w["fields=".len()..].split(',').map(String::from).collect();
                                explicit_fields = true;
                            }
                            w => panic!("fixture: unknown target option `{w}`"),
                        }
                    }
                    targets.push((t, explicit_fields));
                }
                "agreed" => {
                    let (field, value) = parse_field_value(rest[0]);
                    assert_eq!(rest[1], "by", "fixture: `agreed f=v by system @t`");
                    named.insert(field.clone());
                    state.base.fields.insert(
                        field,
                        AgreedField {
                            value,
                            from: Provenance {
                                system: rest[2].to_string(),
                                version: None,
                                source_time_ms: parse_time(rest[3]),
                                rule: Rule::LastWriterWins,
                                decision: 0,
                            },
                        },
                    );
                    has_state = true;
                }
                "tombstone" => {
                    state.base.deleted = true;
                    has_state = true;
                }
                "shadow" => {
                    let system = rest[0].to_string();
                    let mut shadow = Shadow {
                        local_id: Some(default_id(&system)),
                        ..Shadow::default()
                    };
                    let mut section = "fields";
                    for word in &rest[1..] {
                        match *word {
                            "pending" | "diverged" => section = word,
                            "deleted" => shadow.deleted = true,
                            w if w.starts_with("id=") => shadow.local_id = Some(w["id=".len()..].to_string()),
                            w if section == "diverged" => {
                                shadow.diverged.insert(w.to_string());
                            }
                            w => {
                                let (field, value) = parse_field_value(w);
                                named.insert(field.clone());
                                if section == "pending" {
                                    shadow.pending.insert(field, value);
                                } else {
                                    shadow.fields.insert(field, value);
                                }
                            }
                        }
                    }
                    state.shadows.insert(system, shadow);
                    has_state = true;
                }
                "change" | "delete" => {
                    let system = rest[0].to_string();
                    let mut local_id = default_id(&system);
                    let mut fields = Fields::new();
                    for word in &rest[2..] {
                        if let Some(id) = word.strip_prefix("id=") {
                            local_id = id.to_string();
                        } else {
                            let (field, value) = parse_field_value(word);
                            named.insert(field.clone());
                            fields.insert(field, value);
                        }
                    }
                    let kind = if words[0] == "change" {
                        ChangeKind::Upsert
                    } else {
                        ChangeKind::Delete
                    };
                    steps.push(Step::Merge(Change {
                        system,
                        entity: "contact".into(),
                        local_id,
                        kind,
                        fields,
                        version: None,
                        source_time_ms: parse_time(rest[1]),
                    }));
                }
                "confirm" | "abandon" => {
                    let system = rest[0].to_string();
                    let mut local_id = default_id(&system);
                    let mut fields = Fields::new();
                    for word in &rest[1..] {
                        if let Some(id) = word.strip_prefix("id=") {
                            local_id = id.to_string();
                        } else {
                            let (field, value) = parse_field_value(word);
                            fields.insert(field, value);
                        }
                    }
                    steps.push(if words[0] == "confirm" {
                        Step::Confirm {
                            system,
                            local_id,
                            fields,
                        }
                    } else {
                        Step::Abandon { system, fields }
                    });
                }
                other => panic!("fixture: unknown line kind `{other}`"),
            }
        }

        let targets = targets
            .into_iter()
            .map(|(mut t, explicit)| {
                if !explicit {
                    t.fields = named.clone();
                }
                t
            })
            .collect();
        Fixture {
            policy,
            targets,
            state: has_state.then_some(state),
            steps,
        }
    }

    /// Applies every step; returns the final state and the output of the last merge.
    fn run(&self) -> (RecordState, MergeOutput) {
        let targets: Vec<Target<'_>> = self.targets.iter().map(TargetSpec::target).collect();
        let mut state = self.state.clone();
        let mut last = None;
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Merge(change) => {
                    let out = merge(MergeInput {
                        decision_id: i as u64 + 1,
                        global_id: GlobalId::from_u128(1),
                        state: state.as_ref().map(Cow::Borrowed),
                        change: Cow::Borrowed(change),
                        policy: &self.policy,
                        targets: &targets,
                        now_ms: 1_000 + i as TimeMs,
                    });
                    state = Some(out.state.clone());
                    last = Some(out);
                }
                Step::Confirm {
                    system,
                    local_id,
                    fields,
                } => {
                    let state = state.as_mut().expect("fixture: confirm after a merge");
                    confirm_write(state, system, fields, local_id, None, false);
                }
                Step::Abandon { system, fields } => {
                    let state = state.as_mut().expect("fixture: abandon after a merge");
                    abandon_write(state, system, fields);
                }
            }
        }
        let last = last.expect("fixture: at least one change or delete");
        (state.expect("a merge stored a state"), last)
    }
}

fn default_id(system: &str) -> String {
    format!("{system}-1")
}

fn parse_field_value(word: &str) -> (String, Value) {
    let (field, value) = word
        .split_once('=')
        .unwrap_or_else(|| panic!("fixture: expected field=value, got `{word}`"));
    let value = serde_json::from_str(value).unwrap_or_else(|_| panic!("fixture: `{value}` is not JSON"));
    (field.to_string(), value)
}

fn parse_time(word: &str) -> TimeMs {
    word.strip_prefix('@')
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("fixture: expected a time like @10, got `{word}`"))
}

fn parse_non_owner(word: &str) -> NonOwnerPolicy {
    match word {
        "revert" => NonOwnerPolicy::Revert,
        "ignore" => NonOwnerPolicy::Ignore,
        "flag" => NonOwnerPolicy::Flag,
        other => panic!("fixture: unknown non_owner policy `{other}`"),
    }
}

fn mode_name(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Send => "send",
        WriteMode::DryRun => "dry_run",
        WriteMode::OutsideRollout => "outside_rollout",
    }
}

fn render_fields(fields: &Fields) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn render(state: &RecordState, decision: &Decision, writes: &[PlannedWrite]) -> String {
    let mut out = Vec::new();
    for field in &decision.fields {
        let name = if field.field.is_empty() {
            "record"
        } else {
            field.field.as_str()
        };
        let mut line = format!("{name}: {}", field.rule.as_str());
        if let Some(policy) = field.policy {
            line.push(' ');
            line.push_str(policy.as_str());
        }
        if field.conflict {
            line.push_str(" conflict");
        }
        out.push(line);
    }
    out.push(format!(
        "outcome: {}{}",
        decision.outcome.as_str(),
        if decision.flagged { " flagged" } else { "" }
    ));
    for (name, agreed) in &state.base.fields {
        out.push(format!(
            "agreed {name}={} by {} @{}",
            agreed.value, agreed.from.system, agreed.from.source_time_ms
        ));
    }
    if state.base.deleted {
        out.push("tombstone".into());
    }
    let mut writes: Vec<&PlannedWrite> = writes.iter().collect();
    writes.sort_by(|a, b| a.system.cmp(&b.system));
    for write in writes {
        let action = match &write.action {
            WriteAction::Upsert { fields } => format!("upsert {}", render_fields(fields)),
            WriteAction::Delete => "delete".into(),
            WriteAction::SoftDelete { field, value } => format!("soft_delete {field}={value}"),
        };
        out.push(format!("write {} {}: {action}", write.system, mode_name(write.mode)));
    }
    for (system, shadow) in &state.shadows {
        let mut parts = Vec::new();
        match &shadow.local_id {
            None => parts.push("no_id".to_string()),
            Some(id) if *id != default_id(system) => parts.push(format!("id={id}")),
            Some(_) => {}
        }
        if !shadow.pending.is_empty() {
            parts.push(format!("pending {}", render_fields(&shadow.pending)));
        }
        if !shadow.diverged.is_empty() {
            parts.push(format!(
                "diverged {}",
                shadow.diverged.iter().cloned().collect::<Vec<_>>().join(" ")
            ));
        }
        if shadow.deleted {
            parts.push("deleted".into());
        }
        if !parts.is_empty() {
            out.push(format!("shadow {system}: {}", parts.join(" ")));
        }
    }
    out.join("\n")
}

/// The decision's write summaries name exactly the planned writes.
fn assert_summary_matches(decision: &Decision, writes: &[PlannedWrite]) {
    assert_eq!(decision.writes.len(), writes.len(), "one summary per planned write");
    for (summary, write) in decision.writes.iter().zip(writes) {
        assert_eq!(summary.system, write.system);
        assert_eq!(summary.mode, write.mode);
        assert_eq!(summary.fields, write.action.field_names());
        assert_eq!(summary.seq, None, "the merge leaves the outbox sequence to the engine");
    }
}

// ---------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------

const SYSTEMS: [&str; 4] = ["crm", "lms", "hr", "shop"];
const FIELDS: [&str; 3] = ["email", "name", "phone"];

/// Authority and targets of one random entity.
#[derive(Debug, Clone)]
struct Scenario {
    policy: EntityPolicy,
    /// One per system, in `SYSTEMS` order.
    targets: Vec<TargetSpec>,
}

impl Scenario {
    fn targets(&self) -> Vec<Target<'_>> {
        self.targets.iter().map(TargetSpec::target).collect()
    }
    fn target(&self, system: &str) -> Option<&TargetSpec> {
        self.targets.iter().find(|t| t.system == system)
    }
}

/// A change a system makes: values for the fields it maps (`None` leaves one out).
#[derive(Debug, Clone)]
struct ChangeOp {
    system: usize,
    delete: bool,
    values: Vec<Option<Value>>,
    time: TimeMs,
}

#[derive(Debug, Clone)]
enum Op {
    Change(ChangeOp),
    /// The system acknowledges every write queued for it.
    Confirm(usize),
    /// Every write queued for the system is dead-lettered.
    Abandon(usize),
}

/// The engine around the merge, as far as the laws need it: the stored record and a
/// queue of sent writes per system.
struct World<'s> {
    scenario: &'s Scenario,
    state: Option<RecordState>,
    queued: BTreeMap<String, Vec<WriteAction>>,
    decisions: u64,
}

impl<'s> World<'s> {
    fn new(scenario: &'s Scenario) -> Self {
        World {
            scenario,
            state: None,
            queued: BTreeMap::new(),
            decisions: 0,
        }
    }

    fn state(&self) -> &RecordState {
        self.state.as_ref().expect("a merge stored a state")
    }

    fn local_id(&self, system: &str) -> String {
        self.state
            .as_ref()
            .and_then(|s| s.shadows.get(system))
            .and_then(|s| s.local_id.clone())
            .unwrap_or_else(|| default_id(system))
    }

    fn change(&self, op: &ChangeOp) -> Change {
        let system = SYSTEMS[op.system];
        let mapped = &self.scenario.targets[op.system].fields;
        let fields = if op.delete {
            Fields::new()
        } else {
            FIELDS
                .iter()
                .zip(&op.values)
                .filter(|(f, _)| mapped.contains(**f))
                .filter_map(|(f, v)| v.clone().map(|v| (f.to_string(), v)))
                .collect()
        };
        Change {
            system: system.to_string(),
            entity: "contact".into(),
            local_id: self.local_id(system),
            kind: if op.delete {
                ChangeKind::Delete
            } else {
                ChangeKind::Upsert
            },
            fields,
            version: None,
            source_time_ms: op.time,
        }
    }

    fn merge(&mut self, change: &Change) -> MergeOutput {
        self.decisions += 1;
        let targets = self.scenario.targets();
        let out = merge(MergeInput {
            decision_id: self.decisions,
            global_id: GlobalId::from_u128(7),
            state: self.state.as_ref().map(Cow::Borrowed),
            change: Cow::Borrowed(change),
            policy: &self.scenario.policy,
            targets: &targets,
            now_ms: 1_000_000 + self.decisions as TimeMs,
        });
        check_plan(self.scenario, self.state.as_ref(), change, &out);
        for write in out.writes.iter().filter(|w| w.mode == WriteMode::Send) {
            self.queued
                .entry(write.system.clone())
                .or_default()
                .push(write.action.clone());
        }
        self.state = Some(out.state.clone());
        out
    }

    /// Records a write as the system acknowledges it.
    fn acknowledge(&mut self, system: &str, action: &WriteAction) {
        let local_id = self.local_id(system);
        let Some(state) = self.state.as_mut() else { return };
        match action {
            WriteAction::Upsert { fields } => confirm_write(state, system, fields, &local_id, None, false),
            WriteAction::Delete => confirm_write(state, system, &Fields::new(), &local_id, None, true),
            WriteAction::SoftDelete { .. } => confirm_write(state, system, &Fields::new(), &local_id, None, false),
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Change(op) => {
                let change = self.change(op);
                self.merge(&change);
            }
            Op::Confirm(i) => {
                for action in self.queued.remove(SYSTEMS[*i]).unwrap_or_default() {
                    self.acknowledge(SYSTEMS[*i], &action);
                }
            }
            Op::Abandon(i) => {
                let actions = self.queued.remove(SYSTEMS[*i]).unwrap_or_default();
                if let Some(state) = self.state.as_mut() {
                    for action in actions {
                        if let WriteAction::Upsert { fields } = action {
                            abandon_write(state, SYSTEMS[*i], &fields);
                        }
                    }
                }
            }
        }
    }
}

/// What every merge's plan keeps, whatever the inputs.
fn check_plan(scenario: &Scenario, before: Option<&RecordState>, change: &Change, out: &MergeOutput) {
    assert_summary_matches(&out.decision, &out.writes);
    let mut written = BTreeSet::new();
    for write in &out.writes {
        let target = scenario.target(&write.system).expect("writes go only to targets");
        assert!(
            written.insert(write.system.as_str()),
            "at most one write per target and merge"
        );
        assert_eq!(write.mode, target.mode, "a write carries its target's mode");
        match &write.action {
            WriteAction::Upsert { fields } => {
                assert!(!fields.is_empty(), "no empty upsert");
                assert!(!out.state.base.deleted, "no upsert of a tombstone");
                assert!(target.may_create || target.may_update, "no upsert to a read-only link");
                for (name, value) in fields {
                    assert!(target.fields.contains(name), "only fields the link maps");
                    assert_eq!(out.state.base.value(name), Some(value), "upserts carry agreed values");
                    if write.mode == WriteMode::Send {
                        let shadow = &out.state.shadows[&write.system];
                        assert_eq!(shadow.expected(name), Some(value), "a sent value is pending");
                    }
                }
            }
            WriteAction::Delete | WriteAction::SoftDelete { .. } => {
                assert_eq!(
                    out.decision.outcome,
                    Outcome::Deleted,
                    "deletes follow a delete decision"
                );
                assert_ne!(
                    write.system, change.system,
                    "the deleting system is not asked to delete"
                );
                assert!(target.may_update, "deletes go only to links that may change records");
            }
        }
    }
    // No write is missed: once the planned writes land, every system concord may write
    // holds the agreed value of every field its link maps, except where it keeps its
    // own by policy.
    if !out.state.base.deleted {
        for target in scenario.targets.iter().filter(|t| t.mode == WriteMode::Send) {
            let Some(shadow) = out.state.shadows.get(&target.system) else {
                let mapped = out.state.base.fields.iter().filter(|(k, _)| target.fields.contains(*k));
                assert!(
                    !target.may_create || mapped.into_iter().all(|(_, a)| a.value.is_null()),
                    "{} is not created",
                    target.system
                );
                continue;
            };
            let holds = shadow.local_id.is_some() || !shadow.pending.is_empty();
            if shadow.deleted || holds && !target.may_update || !holds && !target.may_create {
                continue;
            }
            for (name, agreed) in out.state.base.fields.iter().filter(|(k, _)| target.fields.contains(*k)) {
                if !shadow.diverged.contains(name) {
                    let expected = shadow.expected(name).unwrap_or(&Value::Null);
                    assert_eq!(expected, &agreed.value, "{} is left behind on {name}", target.system);
                }
            }
        }
    }
    for target in scenario
        .targets
        .iter()
        .filter(|t| t.mode != WriteMode::Send && t.system != change.system)
    {
        let pending =
            |s: Option<&RecordState>| s.and_then(|s| s.shadows.get(&target.system)).map(|s| s.pending.clone());
        assert_eq!(
            pending(before).unwrap_or_default(),
            pending(Some(&out.state)).unwrap_or_default(),
            "writes that are not sent are never pending"
        );
    }
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![Just(Value::Null), Just(json!("x")), Just(json!("y")), Just(json!("z"))]
}

fn non_owner_policy() -> impl Strategy<Value = NonOwnerPolicy> {
    prop_oneof![
        Just(NonOwnerPolicy::Revert),
        Just(NonOwnerPolicy::Ignore),
        Just(NonOwnerPolicy::Flag)
    ]
}

fn field_policy() -> impl Strategy<Value = FieldPolicy> {
    (
        subsequence(SYSTEMS.to_vec(), 0..=3).prop_shuffle(),
        any::<bool>(),
        non_owner_policy(),
    )
        .prop_map(|(owners, owners_equal, non_owner)| FieldPolicy {
            owners: owners.into_iter().map(String::from).collect(),
            owners_equal,
            non_owner,
        })
}

fn policy() -> impl Strategy<Value = EntityPolicy> {
    (
        vec(field_policy(), FIELDS.len()),
        prop_oneof![
            Just(DefaultPolicy::LastWriterWins),
            Just(DefaultPolicy::FirstWriterWins)
        ],
        subsequence(SYSTEMS.to_vec(), 0..=2),
    )
        .prop_map(|(fields, default, delete)| EntityPolicy {
            fields: FIELDS.iter().map(|f| f.to_string()).zip(fields).collect(),
            default,
            delete_allowed_from: delete.into_iter().map(String::from).collect(),
        })
}

fn target_spec(system: &'static str) -> impl Strategy<Value = TargetSpec> {
    (
        subsequence(FIELDS.to_vec(), 1..=FIELDS.len()),
        prop_oneof![4 => Just((true, true)), 1 => Just((true, false)), 1 => Just((false, true)), 1 => Just((false, false))],
        prop_oneof![6 => Just(WriteMode::Send), 1 => Just(WriteMode::DryRun), 1 => Just(WriteMode::OutsideRollout)],
        prop_oneof![
            3 => Just(OnDelete::Propagate),
            1 => Just(OnDelete::Ignore),
            1 => Just(OnDelete::SoftDelete { field: "active".into(), value: json!(false) }),
        ],
    )
        .prop_map(move |(fields, (may_create, may_update), mode, on_delete)| TargetSpec {
            system: system.to_string(),
            fields: fields.into_iter().map(String::from).collect(),
            may_create,
            may_update,
            on_delete,
            mode,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        policy(),
        target_spec(SYSTEMS[0]),
        target_spec(SYSTEMS[1]),
        target_spec(SYSTEMS[2]),
        target_spec(SYSTEMS[3]),
    )
        .prop_map(|(policy, a, b, c, d)| Scenario {
            policy,
            targets: vec![a, b, c, d],
        })
}

fn change_op() -> impl Strategy<Value = ChangeOp> {
    (
        0..SYSTEMS.len(),
        prop::bool::weighted(0.15),
        vec(prop::option::of(value()), FIELDS.len()),
        0..60i64,
    )
        .prop_map(|(system, delete, values, time)| ChangeOp {
            system,
            delete,
            values,
            time,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => change_op().prop_map(Op::Change),
        3 => (0..SYSTEMS.len()).prop_map(Op::Confirm),
        1 => (0..SYSTEMS.len()).prop_map(Op::Abandon),
    ]
}

/// Like `op`, but every change carries a value for `FIELDS[0]`.
fn op_setting_first_field() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (change_op(), value()).prop_map(|(mut c, v)| {
            c.values[0] = Some(v);
            Op::Change(c)
        }),
        3 => (0..SYSTEMS.len()).prop_map(Op::Confirm),
        1 => (0..SYSTEMS.len()).prop_map(Op::Abandon),
    ]
}

fn history() -> impl Strategy<Value = Vec<Op>> {
    vec(op(), 0..10)
}

/// A write that is recorded but not sent (dry run, outside rollout) is planned again
/// while the system differs; it must be one the earlier merge already planned.
fn is_repeat(write: &PlannedWrite, earlier: &[PlannedWrite]) -> bool {
    earlier.iter().any(|e| {
        e.system == write.system
            && e.mode == write.mode
            && match (&e.action, &write.action) {
                (WriteAction::Upsert { fields: old }, WriteAction::Upsert { fields: new }) => {
                    new.iter().all(|(k, v)| old.get(k) == Some(v))
                }
                (old, new) => old == new,
            }
    })
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

fn config() -> ProptestConfig {
    // Failures are turned into `check` rows rather than regression files. A thousand
    // cases take about a second unoptimised; PROPTEST_CASES raises it for a long hunt.
    ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// A system's echo of the writes a merge sent it changes nothing and sends nothing.
    #[test]
    fn echo_is_a_noop(scenario in scenario(), history in history(), op in change_op()) {
        let mut world = World::new(&scenario);
        for step in &history {
            world.apply(step);
        }
        let change = world.change(&op);
        let first = world.merge(&change);
        let sent: Vec<&PlannedWrite> = first.writes.iter().filter(|w| w.mode == WriteMode::Send).collect();
        for write in &sent {
            world.acknowledge(&write.system, &write.action);
        }
        for write in &sent {
            let base = world.state().base.clone();
            let shadow = world.state().shadows[&write.system].clone();
            let echo = Change {
                system: write.system.clone(),
                entity: "contact".into(),
                local_id: shadow.local_id.clone().expect("an acknowledged write names the record"),
                kind: if shadow.deleted { ChangeKind::Delete } else { ChangeKind::Upsert },
                fields: if shadow.deleted { Fields::new() } else { shadow.fields.clone() },
                version: None,
                source_time_ms: 100,
            };
            let out = world.merge(&echo);
            prop_assert_eq!(&out.state.base, &base, "the echo from {} changed the agreed record", write.system);
            for w in &out.writes {
                prop_assert!(w.mode != WriteMode::Send, "the echo from {} sent {:?}", write.system, w);
                prop_assert!(is_repeat(w, &first.writes), "the echo from {} planned a new {:?}", write.system, w);
            }
        }
    }

    /// Merging the same change again changes nothing agreed and sends nothing.
    #[test]
    fn replay_is_a_noop(scenario in scenario(), history in history(), op in change_op()) {
        let mut world = World::new(&scenario);
        for step in &history {
            world.apply(step);
        }
        let change = world.change(&op);
        let first = world.merge(&change);
        let second = world.merge(&change);
        prop_assert_eq!(&second.state.base, &first.state.base);
        prop_assert_eq!(second.decision.outcome, Outcome::Noop);
        for w in &second.writes {
            prop_assert!(w.mode != WriteMode::Send, "the replay sent {:?}", w);
            prop_assert!(is_repeat(w, &first.writes), "the replay planned a new {:?}", w);
        }
    }

    /// With one owner O of `email`: every proposal of O (a value other than the one O
    /// last reported and other than the agreed one) is accepted, and from then on the
    /// agreed value is O's latest proposal, whatever other systems send or delete.
    #[test]
    fn owner_change_always_wins_over_non_owners(
        mut scenario in scenario(),
        owner in 0..SYSTEMS.len(),
        ops in vec(op_setting_first_field(), 1..24),
    ) {
        let owner_name = SYSTEMS[owner];
        let email = FIELDS[0];
        let field = scenario.policy.fields.get_mut(email).expect("every field has a policy");
        field.owners = vec![owner_name.to_string()];
        for target in &mut scenario.targets {
            target.fields.insert(email.to_string());
        }
        let mut world = World::new(&scenario);
        let mut claimed: Option<Value> = None;
        for op in &ops {
            let mut proposal = None;
            if let Op::Change(c) = op {
                let change = world.change(c);
                if c.system == owner && change.kind == ChangeKind::Upsert {
                    if let Some(v) = change.fields.get(email) {
                        let state = world.state.as_ref();
                        let reported = state
                            .and_then(|s| s.shadows.get(owner_name))
                            .and_then(|s| s.fields.get(email))
                            .unwrap_or(&Value::Null);
                        let agreed = state.and_then(|s| s.base.value(email)).unwrap_or(&Value::Null);
                        if v != reported && v != agreed {
                            proposal = Some(v.clone());
                        }
                    }
                }
                let out = world.merge(&change);
                if let Some(v) = proposal {
                    let decided = out.decision.fields.iter().find(|f| f.field == email);
                    prop_assert_eq!(decided.map(|f| f.rule), Some(Rule::Owner));
                    claimed = Some(v);
                }
            } else {
                world.apply(op);
            }
            if let Some(v) = &claimed {
                let agreed = world.state().base.fields.get(email);
                prop_assert_eq!(agreed.map(|a| &a.value), Some(v), "after {:?}", op);
                prop_assert_eq!(agreed.map(|a| a.from.system.as_str()), Some(owner_name));
            }
        }
    }

    /// One change per system, at distinct source times, merged in every order from a
    /// first sighting: every field that one of its owners sets ends with the same
    /// value, the one of the highest owner (or, with `owners_equal`, of the latest).
    /// Each owner's values are its own: a value that another system already holds is
    /// indistinguishable from an echo of it, and echoes carry no authority.
    #[test]
    fn owned_fields_do_not_depend_on_arrival_order(
        scenario in scenario(),
        values in vec(vec(prop::option::of(value()), FIELDS.len()), SYSTEMS.len()),
        times in Just(vec![10, 20, 30, 40]).prop_shuffle(),
    ) {
        let mut changes = Vec::new();
        for (s, system) in SYSTEMS.iter().enumerate() {
            let values = FIELDS
                .iter()
                .zip(&values[s])
                .map(|(f, v)| {
                    let owns = scenario.policy.fields[*f].owners.iter().any(|o| o == system);
                    match v {
                        Some(Value::String(text)) if owns => Some(json!(format!("{system}:{text}"))),
                        v => v.clone(),
                    }
                })
                .collect();
            changes.push(ChangeOp { system: s, delete: false, values, time: times[s] });
        }

        // The value every order must agree on, per field one of its owners sets.
        let mut expected: BTreeMap<&str, Value> = BTreeMap::new();
        for (i, field) in FIELDS.iter().enumerate() {
            let policy = &scenario.policy.fields[*field];
            let setters = policy.owners.iter().filter_map(|o| {
                let s = SYSTEMS.iter().position(|x| x == o).expect("owners are systems");
                let mapped = scenario.targets[s].fields.contains(*field);
                let value = changes[s].values[i].clone().filter(|v| mapped && !v.is_null());
                value.map(|v| (changes[s].time, v))
            });
            let winner = if policy.owners_equal { setters.max_by_key(|(t, _)| *t) } else { setters.into_iter().next() };
            if let Some((_, v)) = winner {
                expected.insert(field, v);
            }
        }

        for order in permutations(SYSTEMS.len()) {
            let mut world = World::new(&scenario);
            for &s in &order {
                let change = world.change(&changes[s]);
                world.merge(&change);
            }
            for (field, value) in &expected {
                prop_assert_eq!(world.state().base.value(field), Some(value), "{} in order {:?}", field, order);
            }
        }
    }

    /// The same inputs give the same outputs.
    #[test]
    fn merge_is_deterministic(scenario in scenario(), history in history()) {
        let run = || {
            let mut world = World::new(&scenario);
            let mut outputs = Vec::new();
            for op in &history {
                if let Op::Change(c) = op {
                    let change = world.change(c);
                    let out = world.merge(&change);
                    outputs.push((out.state, out.decision, out.writes));
                } else {
                    world.apply(op);
                }
            }
            (outputs, world.state.clone())
        };
        prop_assert_eq!(run(), run());
    }
}
