/*
 * devmeter's subscribe guard for Mosquitto 2.0 (plugin API v5).
 *
 * Mosquitto 2.0's acl_file checks read rights when it delivers a message, not when a client
 * subscribes: a device that subscribes to devmeter/#, $share/... or $SYS/# is granted the
 * subscription and then receives nothing. This plugin refuses such a SUBSCRIBE outright
 * (SUBACK 0x87 in MQTT 5, 0x80 in 3.1.1), so a device learns at once that it may not, and
 * a shared-subscription group can never count a device among its members. Only the reader
 * named by `plugin_opt_reader` (devmeter's ingest) may subscribe; every other check (CONNECT,
 * PUBLISH, delivery) is left to the password and ACL files devmeter writes.
 *
 * Built by ./dev and the Dockerfile:
 *   cc -shared -fPIC -O2 -o devmeter_guard.so devmeter_guard.c
 */
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin_id = NULL;
static char *reader = NULL;

static int on_acl_check(int event, void *event_data, void *userdata)
{
    struct mosquitto_evt_acl_check *ed = event_data;
    const char *username;

    (void)event;
    (void)userdata;
    if (ed->access != MOSQ_ACL_SUBSCRIBE) {
        return MOSQ_ERR_PLUGIN_DEFER;
    }
    username = mosquitto_client_username(ed->client);
    if (reader != NULL && username != NULL && strcmp(username, reader) == 0) {
        return MOSQ_ERR_PLUGIN_DEFER;
    }
    return MOSQ_ERR_ACL_DENIED;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    int i;

    for (i = 0; i < supported_version_count; i++) {
        if (supported_versions[i] == 5) {
            return 5;
        }
    }
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
    int i;

    (void)userdata;
    plugin_id = identifier;
    for (i = 0; i < option_count; i++) {
        if (strcmp(options[i].key, "reader") == 0) {
            free(reader);
            reader = strdup(options[i].value);
        }
    }
    if (reader == NULL) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "devmeter_guard: plugin_opt_reader is required");
        return MOSQ_ERR_INVAL;
    }
    return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    (void)userdata;
    (void)options;
    (void)option_count;
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    free(reader);
    reader = NULL;
    return MOSQ_ERR_SUCCESS;
}
